"""FedAvg: the digits MLP trained by 8 replicas on non-IID shards (Dirichlet label skew,
alpha 0.5), aggregated every round; the aggregated model's test accuracy is logged per round.

Run by the one training loop (``fjt.replicas.program``: checkpointed every 10 rounds, resumable,
stopped by SIGTERM like any run); ``fjt.fit`` then trains the centralised baseline (one model,
batch 8 * train.batch_size, as many steps as each replica takes) into WORKDIR/centralized and
reports its accuracy as ``centralized_accuracy`` in summary.json. Measured on 2 CPU cores (seed 0):
aggregated accuracy 0.9833 vs centralized 0.9806 (360 test images), about 20 s in all.
"""

import os

import ml_collections

from fjt.config import load_config

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_mlp.py")


def get_config() -> ml_collections.ConfigDict:
  config = load_config(BASE)
  config.replicas = ml_collections.ConfigDict({
      "num": 8,
      "split": "dirichlet",  # iid | dirichlet
      "alpha": 0.5,  # Dirichlet concentration: smaller is more skewed.
      "min_size": 10,  # Examples per replica at least (the split is re-drawn until it holds).
      "seed": 0,  # Of the split; batches use config.seed.
      "local_steps": 10,
      "rounds": 40,
      "server_optimizer": "none",  # none | momentum (FedAvgM) | nesterov (DiLoCo outer step)
      "server_learning_rate": 1.0,  # "none" with 1.0 is plain FedAvg.
      "server_momentum": 0.0,
      "optimizer_state": "keep",  # keep (each replica its own) | average
  })
  config.train.batch_size = 32  # Per replica.
  config.train.steps = 400  # Set to rounds * local_steps by a replica run.
  config.checkpoint.every_steps = 100  # Steps, as train.steps counts them: every 10 rounds.
  config.optimizer.learning_rate = 0.05  # Pinned: the numbers above were measured with it.
  config.optimizer.warmup_steps = 20
  config.ema.decay = 0.0  # Replicas keep no temporal averages.
  config.swa.every = 0
  return config
