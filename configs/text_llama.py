"""A small Llama on the Python standard library's docstrings: ``text_gpt.py`` with a Llama.

The same data, 5,000-word vocabulary, file split, 64-token windows and sliding evaluation
(``data.eval_stride``) as ``text_gpt.py``, and the same optimizer, batches and steps, so the
perplexities compare. The model is the Llama architecture (``fjt.models.Llama``: RMSNorm,
rotary positions, SwiGLU, grouped-query attention) at about GPT's size: 2 layers, 256 wide, 4
query heads sharing 2 key/value heads, SwiGLU width 832, the head tied to the embedding (as
Llama 3.2's small models): 2.9M parameters (1.3M of them the embedding). Dropout 0.1 on the
residual branches as ``text_gpt`` (an fjt addition; HF's Llama has none).
"""

import os

import ml_collections

from fjt.config import load_config

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "text_gpt.py")


def get_config() -> ml_collections.ConfigDict:
  config = load_config(BASE)
  config.model = ml_collections.ConfigDict({
      "name": "llama", "vocab_size": config.data.vocab_size, "block_size": config.data.block_size,
      "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "embed_dim": 256, "mlp_dim": 832,
      "tie_embeddings": True, "dropout_rate": 0.1, "dtype": "float32", "param_dtype": "float32"})
  return config
