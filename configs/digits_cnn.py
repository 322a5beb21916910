"""CNN on scikit-learn's digits, NHWC 8x8x1 images: the digits MLP experiment
(``digits_mlp.py``: optimizer, steps, checkpoints) with a CNN, a larger learning rate and no
weight averages."""

import os

import ml_collections

from fjt.config import load_config

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_mlp.py")


def get_config() -> ml_collections.ConfigDict:
  config = load_config(BASE)
  config.data.layout = "nhwc"
  config.model = ml_collections.ConfigDict(
      {"name": "cnn", "features": (32, 64), "kernel_size": 3, "pool": True,
       "dense_features": (128,), "num_classes": 10, "momentum": 0.9})
  config.optimizer.learning_rate = 0.1
  config.ema.decay = 0.0  # 0 disables.
  config.swa.every = 0  # 0 disables.
  config.swa.start_step = 0
  return config
