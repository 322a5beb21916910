"""Fine-tuning the trained ``text_gpt`` on a few standard-library packages (the merge demo).

Starts from the base run's weights (``--config.init_from=runs/text_gpt``, a fresh optimizer) and
trains on the docstrings of ``data.sources`` only, with the base's vocabulary (it is built from
every training file whatever the sources), so fine-tunes of one base merge leaf by leaf. The
default sources are the demo's "web" group; the README's merge demo overrides them, e.g.
``--config.data.sources="('asyncio','concurrent','multiprocessing','unittest')"``. The base has
trained on these files already and a group holds only 12k-27k training words (10-13 steps of
32 x 64 words), so fine-tuning overfits fast: 200 steps at 3e-4 made every group's validation
perplexity worse than the base's (g1 98.8 -> 115.5). 30 steps at a constant 1e-4 after 5
warm-up steps is the short adaptation the merge demo uses.
"""

import os

import ml_collections

from fjt.config import load_config

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "text_gpt.py")


def get_config() -> ml_collections.ConfigDict:
  config = load_config(BASE)
  config.data.sources = ("email", "http", "urllib", "xml", "json")
  config.init_from = "runs/text_gpt"
  config.optimizer.learning_rate = 1e-4
  config.optimizer.warmup_steps = 5
  config.optimizer.final_lr_fraction = 1.0  # Constant after the warm-up.
  config.train.steps = 30
  config.train.eval_every = 30
  config.train.log_every = 10
  config.checkpoint.every_steps = 30
  config.checkpoint.best_metric = ""
  return config
