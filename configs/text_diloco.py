"""DiLoCo (Douillard et al., 2023) on the Python standard library's docstrings.

The ``text_gpt`` model, vocabulary and token windows, trained by 4 replicas that each take
``local_steps`` (H) inner AdamW steps on their own shard between synchronisations; the outer step
is Nesterov SGD (lr 0.7, momentum 0.9) on the averaged pseudo-gradient, after a short warm start
of ordinary data-parallel steps. In the same run ``fjt.replicas.fit`` trains the baselines
``sync`` (data parallel with the global batch, as many steps) and ``single`` (one worker, the
per-replica batch): summary.json has ``eval.perplexity``, ``eval.sync_perplexity``,
``eval.single_perplexity`` and ``replicas.communication``.
"""

import os

import ml_collections

from fjt.config import load_config

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "text_gpt.py")


def get_config() -> ml_collections.ConfigDict:
  config = load_config(BASE)
  config.replicas = ml_collections.ConfigDict({
      "num": 4,
      "split": "iid",  # iid, or by_source: each replica reads whole top-level packages.
      "seed": 0,
      "local_steps": 50,  # H: inner steps between synchronisations.
      "rounds": 12,
      "warmup_steps": 100,  # Synchronous data-parallel steps before the first round.
      "server_optimizer": "nesterov",
      "server_learning_rate": 0.7,
      "server_momentum": 0.9,
      "optimizer_state": "keep",
      "communication_dtype": "bfloat16",
      "baselines": ("sync", "single"),
  })
  config.train.batch_size = 8  # Per replica: the global batch of 32 is text_gpt's.
  config.train.eval_every = 50
  config.checkpoint.every_steps = 0
  return config
