"""The in-memory dataset every loader returns."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Two splits of host arrays, each ``{"x": inputs, "y": int32 labels}``.

  Attributes:
    train: training split, indexed by ``fjt.data.get_batch``.
    test: held-out split (the validation split for text).
    num_classes: number of labels, i.e. the width of the model's output.
    info: extra facts about the data (vocabulary, baselines), JSON-friendly.
  """
  train: dict[str, np.ndarray]
  test: dict[str, np.ndarray]
  num_classes: int
  info: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def num_train(self) -> int:
    return len(self.train["y"])
