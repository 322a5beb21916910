"""MLP on scikit-learn's digits, flat 64-pixel inputs."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = ml_collections.ConfigDict({"name": "digits", "layout": "flat", "classes": ()})
  config.model = ml_collections.ConfigDict(
      {"name": "mlp", "features": (256, 256), "num_classes": 10, "batch_norm": True, "momentum": 0.9})
  config.optimizer = ml_collections.ConfigDict({
      "name": "sgd", "learning_rate": 0.05, "momentum": 0.9, "nesterov": True,
      "weight_decay": 5e-4, "schedule": "warmup_cosine", "warmup_steps": 100,
      "final_lr_fraction": 0.0, "grad_clip_norm": 0.0})
  config.train = ml_collections.ConfigDict(
      {"steps": 2000, "batch_size": 64, "eval_every": 500, "log_every": 100, "eval_batch_size": 512})
  config.checkpoint = ml_collections.ConfigDict(
      {"every_steps": 500, "max_to_keep": 2, "best_metric": "accuracy", "best_mode": "max", "fallback": False})
  config.ema = ml_collections.ConfigDict({"decay": 0.99})  # 0 disables.
  config.swa = ml_collections.ConfigDict({"start_step": 1500, "every": 10})  # every 0 disables.
  return config
