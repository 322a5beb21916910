"""LoRA fine-tune of the trained text_gpt run on new English text: the Python Language
Reference's topics that ``pydoc`` shows (``pydoc_data/topics.py``, shipped with the interpreter:
strings, not docstrings, so not in text_gpt's corpus), read with text_gpt's vocabulary.

  python scripts/train.py --config configs/text_gpt.py --workdir runs/text_gpt
  python scripts/prepare_text.py runs/topics_text --out runs/topics_tokens --vocab_from runs/text_gpt
  python scripts/train.py --config configs/text_gpt_lora.py --workdir runs/text_gpt_lora

(the README's LoRA section writes ``runs/topics_text``). Rank-8 adapters on every attention and
MLP kernel (``c_attn``, ``c_proj``, ``c_fc`` of both blocks); the embeddings, LayerNorms and
biases stay as text_gpt trained them. ``--config.lora.rank=0`` fine-tunes the whole model instead.
"""

import os

import ml_collections

from fjt.config import load_config

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "text_gpt.py")


def get_config() -> ml_collections.ConfigDict:
  config = load_config(BASE)
  config.data = ml_collections.ConfigDict(
      {"name": "tokens", "path": "runs/topics_tokens", "block_size": 64, "eval_stride": 32})
  config.init_from = "runs/text_gpt"
  config.lora = ml_collections.ConfigDict(
      {"rank": 8, "alpha": 16.0, "targets": (r"(attn|mlp)/c_\w+/kernel",)})
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 20
  config.train.steps = 300
  config.train.eval_every = 50
  config.train.log_every = 50
  config.checkpoint.every_steps = 100
  return config
