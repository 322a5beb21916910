"""CNN on scikit-learn's digits, NHWC 8x8x1 images."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = ml_collections.ConfigDict({"name": "digits", "layout": "nhwc", "classes": ()})
  config.model = ml_collections.ConfigDict(
      {"name": "cnn", "features": (32, 64), "kernel_size": 3, "pool": True,
       "dense_features": (128,), "num_classes": 10, "momentum": 0.9})
  config.optimizer = ml_collections.ConfigDict({
      "name": "sgd", "learning_rate": 0.1, "momentum": 0.9, "nesterov": True,
      "weight_decay": 5e-4, "schedule": "warmup_cosine", "warmup_steps": 100,
      "final_lr_fraction": 0.0, "grad_clip_norm": 0.0})
  config.train = ml_collections.ConfigDict(
      {"steps": 2000, "batch_size": 64, "eval_every": 500, "log_every": 100, "eval_batch_size": 512})
  config.checkpoint = ml_collections.ConfigDict(
      {"every_steps": 500, "max_to_keep": 2, "best_metric": "accuracy", "best_mode": "max", "fallback": False})
  config.ema = ml_collections.ConfigDict({"decay": 0.0})  # 0 disables.
  config.swa = ml_collections.ConfigDict({"start_step": 0, "every": 0})  # every 0 disables.
  config.mesh = ml_collections.ConfigDict({"data": -1})  # -1: every device.
  config.distributed = ml_collections.ConfigDict({"timeout_s": 60})  # A dead peer ends the run.
  config.init_from = ""  # A checkpoint to start from (run workdir, step or saved directory).
  config.init_skip = ()  # Path patterns (regex) not to load from init_from, e.g. a new head.
  config.freeze = ()  # Path patterns (regex) of parameters that get no updates.
  return config
