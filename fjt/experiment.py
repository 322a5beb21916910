"""A config to the right loop: one model (``fjt.train.fit``) or N replicas in rounds
(``fjt.replicas.fit``). This module sits above both loops, so neither imports the other's
dispatch."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import ml_collections

from fjt import replicas, train
from fjt.config import with_run_defaults
from fjt.data import Dataset
from fjt.steps import TaskLike


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       model: nn.Module | None = None, dataset: Dataset | None = None,
                       task: TaskLike | None = None, progress: bool = True) -> dict[str, Any]:
  """Trains ``config`` and returns its summary: ``{"step": ..., "eval": {...}}``.

  A config with a ``replicas`` group trains N replicas in rounds (``fjt.replicas.fit``); any
  other is one model, data parallel over the devices (``fjt.train.fit``). ``model``,
  ``dataset`` and ``task`` replace what the config names, as in ``fit``.
  """
  config = with_run_defaults(config)
  fit = replicas.fit if config.get("replicas") else train.fit
  return fit(config, workdir, model=model, dataset=dataset, task=task, progress=progress)[1]
