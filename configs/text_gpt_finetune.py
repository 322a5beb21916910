"""Fine-tuning the trained ``text_gpt`` on a few standard-library packages (the merge demo).

Starts from the base run's weights (``--config.init_from=runs/text_gpt``, a fresh optimizer) and
trains on the docstrings of ``data.sources`` only, with the base's vocabulary (it is built from
every training file whatever the sources), so fine-tunes of one base merge leaf by leaf. The
default sources are the demo's "web" group; the README's merge demo overrides them, e.g.
``--config.data.sources="('asyncio','concurrent','multiprocessing','unittest')"``. 200 steps at a
constant 3e-4 after 20 warm-up steps: enough to move each group's validation perplexity clearly.
"""

import os

import ml_collections

from fjt.config import load_config

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "text_gpt.py")


def get_config() -> ml_collections.ConfigDict:
  config = load_config(BASE)
  config.data.sources = ("email", "http", "urllib", "xml", "json")
  config.init_from = "runs/text_gpt"
  config.optimizer.learning_rate = 3e-4
  config.optimizer.warmup_steps = 20
  config.optimizer.final_lr_fraction = 1.0  # Constant after the warm-up.
  config.train.steps = 200
  config.train.eval_every = 100
  config.train.log_every = 50
  config.checkpoint.every_steps = 100
  config.checkpoint.best_metric = ""
  return config
