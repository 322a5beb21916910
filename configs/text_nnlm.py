"""Neural language model on the Python standard library's docstrings."""

import ml_collections

VOCAB_SIZE = 5000


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = ml_collections.ConfigDict({"name": "text", "vocab_size": VOCAB_SIZE, "context": 4})
  config.model = ml_collections.ConfigDict(
      {"name": "nnlm", "vocab_size": VOCAB_SIZE, "embed_dim": 300, "hidden": 512, "momentum": 0.9})
  config.optimizer = ml_collections.ConfigDict({
      "name": "adamw", "learning_rate": 2e-3, "weight_decay": 0.01, "schedule": "warmup_cosine",
      "warmup_steps": 100, "final_lr_fraction": 0.0, "grad_clip_norm": 1.0})
  config.train = ml_collections.ConfigDict(
      {"steps": 1200, "batch_size": 256, "eval_every": 400, "log_every": 100, "eval_batch_size": 2048})
  config.checkpoint = ml_collections.ConfigDict(
      {"every_steps": 400, "max_to_keep": 2, "best_metric": "perplexity", "best_mode": "min", "fallback": False})
  return config
