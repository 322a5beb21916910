"""ResNet on scikit-learn's digits, NHWC 8x8x1 images: the digits CNN experiment
(``digits_cnn.py``) with a small ResNet: a 3x3 stem for 8x8 images, no max pool, two stages of
one BasicBlock each (8x8x16, then 4x4x32), global average pool, a Dense head."""

import os

import ml_collections

from fjt.config import load_config

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_cnn.py")


def get_config() -> ml_collections.ConfigDict:
  config = load_config(BASE)
  config.model = ml_collections.ConfigDict(
      {"name": "resnet", "stage_sizes": (1, 1), "widths": (16, 32), "block": "basic",
       "num_classes": 10, "stem": "small", "stem_width": 16, "momentum": 0.9})
  config.train.steps = 600
  config.train.eval_every = 300
  config.checkpoint.every_steps = 300
  return config
