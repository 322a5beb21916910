"""DiLoCo (Douillard et al., 2023) on the Python standard library's docstrings.

The ``text_gpt`` model, vocabulary and token windows, trained by 4 replicas that each take
``local_steps`` (H = 50) inner AdamW steps (batch 8 each) on their own shard between
synchronisations; the outer step is Nesterov SGD on the averaged pseudo-gradient (lr 0.7,
momentum 0.5), after a warm start of 500 ordinary data-parallel steps (global batch 32), as the
paper starts from a model trained synchronously. 500 + 12 rounds x 50 = 1,100 inner steps, as
``text_gpt``. The run is checkpointed every 50 steps (every 50 warm-start steps, then every
round) and resumes like any run; after it ``fjt.fit`` trains the baselines ``sync`` (data
parallel with the global batch of 32, as many steps) and ``single`` (one worker, batch 8), each
its own resumable run in WORKDIR/sync and WORKDIR/single:
summary.json has ``eval.perplexity``, ``eval.sync_perplexity``, ``eval.single_perplexity`` and
``communication``.

Outer momentum 0.5, not the paper's 0.9: here, with 12 rounds and an inner learning rate that
decays to 0, momentum 0.9 overshot (validation perplexity fell to 142 by round 6, then rose to
160 while the synchronous run kept improving); 0.5 and plain averaging (lr 1, no momentum)
both track the synchronous run. The README lists every setting tried with its perplexities.
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
      "warmup_steps": 500,  # Synchronous data-parallel steps before the first round.
      "server_optimizer": "nesterov",
      "server_learning_rate": 0.7,
      "server_momentum": 0.5,
      "optimizer_state": "keep",
      "communication_dtype": "bfloat16",
      "baselines": ("sync", "single"),
  })
  config.train.batch_size = 8  # Per replica: the global batch of 32 is text_gpt's.
  config.train.eval_every = 50
  config.checkpoint.every_steps = 50  # Steps: every 50 warm-start steps, then every round.
  return config
