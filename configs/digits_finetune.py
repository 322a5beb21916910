"""Fine-tuning: pretrain the digits CNN on digits 0-4, then train a new 5-class
head on digits 5-9 with the body (convolutions, BatchNorm, hidden Dense) frozen.

The pretraining run lands in WORKDIR/pretrain; summary.json reports the
fine-tuned accuracy on the digits 5-9 test split under "eval", and the
pretraining run's summary under "pretrain".
"""

import os

import ml_collections

from fjt.config import load_config

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_cnn.py")


def get_config() -> ml_collections.ConfigDict:
  pretrain = load_config(BASE)
  pretrain.data.classes = (0, 1, 2, 3, 4)
  pretrain.model.num_classes = 5
  pretrain.train.steps = 1000

  config = load_config(BASE)
  config.pretrain = pretrain
  config.data.classes = (5, 6, 7, 8, 9)
  config.model.num_classes = 5
  config.init_from = ""  # Empty: start from the pretraining run in WORKDIR/pretrain.
  config.init_skip = (r"^params/Dense_1/",)  # The head: a fresh one for the new classes.
  config.freeze = (r"^params/(Conv_\d+|BatchNorm_\d+|Dense_0)/",)  # Everything but the head.
  config.optimizer.learning_rate = 0.05
  config.train.steps = 500
  config.train.eval_every = 250
  config.checkpoint.every_steps = 250
  return config
