"""A small GPT on the Python standard library's docstrings, sized for a CPU.

The same 5,000-word vocabulary and train/validation file split as ``text_nnlm.py``, so the
perplexities compare: the docstrings of each split are one token stream (``<s>`` before each
docstring), trained on random windows of 64 tokens. Evaluation slides a 64-token window over
the validation stream 32 tokens at a time and scores each word once (``data.eval_stride``), so
every word after the first window is predicted from at least 32 words of context, as the NNLM
predicts every word from its 4; ``--config.data.eval_stride=64`` scores consecutive windows
instead (the first words of each then have almost no context). 2 layers, 256 wide, 4 heads:
2.9M parameters (1.3M of them the tied embedding). 1,100 steps: longer runs overfit the 252k
training words (1,600 steps gave a higher validation perplexity).
"""

import ml_collections

VOCAB_SIZE = 5000
BLOCK_SIZE = 64


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = ml_collections.ConfigDict(
      {"name": "text", "vocab_size": VOCAB_SIZE, "block_size": BLOCK_SIZE, "eval_stride": 32})
  config.model = ml_collections.ConfigDict({
      "name": "gpt", "vocab_size": VOCAB_SIZE, "block_size": BLOCK_SIZE, "num_layers": 2,
      "num_heads": 4, "embed_dim": 256, "dropout_rate": 0.1, "dtype": "float32",
      "param_dtype": "float32"})
  config.optimizer = ml_collections.ConfigDict({
      "name": "adamw", "learning_rate": 1.5e-3, "weight_decay": 0.1, "decay_mask": "gpt",
      "schedule": "warmup_cosine", "warmup_steps": 100, "final_lr_fraction": 0.0,
      "grad_clip_norm": 1.0})
  config.train = ml_collections.ConfigDict(
      {"steps": 1100, "batch_size": 32, "eval_every": 275, "log_every": 100, "eval_batch_size": 64})
  config.checkpoint = ml_collections.ConfigDict(
      {"every_steps": 275, "max_to_keep": 2, "best_metric": "perplexity", "best_mode": "min",
       "fallback": False})
  return config
