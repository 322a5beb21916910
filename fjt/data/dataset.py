"""The in-memory dataset every loader returns, and the word vocabulary its ``info`` may carry."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Sources:
  """Where each training example came from (for non-IID splits by source).

  Attributes:
    ids: int ``(num_train,)``: example ``i`` came from source ``names[ids[i]]``.
    names: the sources' names (for the standard-library corpus: top-level packages and
      modules, ``email``, ``json``, ``os``), indexed by ``ids``.
  """
  ids: np.ndarray
  names: tuple[str, ...]

  def __post_init__(self):
    ids = np.asarray(self.ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"Sources.ids: expected a 1-D int array, got {ids.dtype} {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= len(self.names)):
      raise ValueError(f"Sources.ids: ids lie in [{ids.min()}, {ids.max()}], outside the "
                       f"{len(self.names)} names")


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Two splits of host arrays, each ``{"x": inputs, "y": targets}`` (plus an optional
  ``mask``, see ``fjt.tasks``). ``x`` may be an array or a dict of arrays; every array of a
  split has the same leading (example) axis.

  Attributes:
    train: training split, indexed by ``fjt.data.get_batch``.
    test: held-out split (the validation split for text).
    num_classes: number of classes, i.e. the width of the model's output; None for
      targets that are not class ids (regression).
    info: extra facts about the data, JSON-friendly: ``task`` (the default task's name),
      ``layout`` of images, vocabulary size, baselines.
    sources: where each training example came from, for datasets that know it (text: the
      top-level package of each docstring's file); None otherwise.
  """
  train: dict[str, Any]
  test: dict[str, Any]
  num_classes: int | None
  info: dict[str, Any] = dataclasses.field(default_factory=dict)
  sources: Sources | None = None

  def __post_init__(self):
    if self.sources is not None and len(self.sources.ids) != self.num_train:
      raise ValueError(f"Dataset.sources: {len(self.sources.ids)} source ids for "
                       f"{self.num_train} training examples")

  @property
  def num_train(self) -> int:
    return num_examples(self.train)

  @property
  def task(self) -> str:
    """The name of the task these targets are for (``fjt.TASKS``)."""
    return self.info.get("task", "classification")


def num_examples(arrays) -> int:
  """The length of the leading axis shared by every array of ``arrays`` (a pytree)."""
  import jax  # Local: this module is imported by light tools too.

  lengths = {len(leaf) for leaf in jax.tree.leaves(arrays)}
  if len(lengths) != 1:
    raise ValueError(f"the arrays of a split must have one number of examples, got {sorted(lengths)}")
  return lengths.pop()


_DATA_BASELINES = {"unigram_perplexity": "unigram model"}  # Dataset.info key: plot label.


def data_baselines(dataset: Dataset) -> dict[str, float]:
  """The metrics of models of the data alone that ``dataset.info`` knows (``unigram_perplexity``
  of text), reported in summary.json's ``eval`` beside a run's own."""
  return {k: dataset.info[k] for k in _DATA_BASELINES if k in dataset.info}


def baseline_lines(dataset: Dataset) -> dict[str, float]:
  """``data_baselines`` by plot label, the horizontal lines of ``metrics.png``."""
  return {_DATA_BASELINES[k]: v for k, v in data_baselines(dataset).items()}


def dataset_vocabulary(info: Mapping[str, Any]) -> list[str] | None:
  """The words, in id order, of a dataset's ``info``: ``info["vocab"]``, or the list of a word
  tokenizer ``info["tokenizer"] = {"type": "word", "vocab": [...]}`` (a dict or its JSON);
  None for data without a word vocabulary (a BPE tokenizer, images)."""
  if info.get("vocab") is not None:
    return list(info["vocab"])
  tokenizer = info.get("tokenizer")
  if isinstance(tokenizer, str):
    try:  # A token folder's info names its tokenizer file; others hold the JSON itself.
      if os.path.isfile(tokenizer):
        with open(tokenizer, encoding="utf-8") as f:
          tokenizer = f.read()
      tokenizer = json.loads(tokenizer)
    except (OSError, ValueError):
      return None
  if isinstance(tokenizer, Mapping) and tokenizer.get("type") == "word":
    return list(tokenizer["vocab"])
  return None
