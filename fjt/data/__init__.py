"""Datasets that need no network, the user's own arrays and text files, and deterministic
batching.

``DATASETS`` maps a name (``config.data.name``) to a loader whose keyword arguments are the
other keys of ``config.data``; ``register`` adds a loader of your own::

  @fjt.data.register("my_data")
  def load(path: str, scale: float = 1.0) -> fjt.Dataset: ...
"""

import inspect
from collections.abc import Callable, Mapping

from fjt import config as fjt_config
from fjt.config import ConfigError
from fjt.data import arrays, digits, text, text_files, tokens
from fjt.data.batching import batch_indices, eval_batches, get_batch, steps_per_epoch
from fjt.data.dataset import (Dataset, Sources, baseline_lines, data_baselines, dataset_vocabulary,
                              num_examples)

DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": digits.load,
    "text": text.load,
    "arrays": arrays.load,
    "text_files": text_files.load,
    "tokens": tokens.load,
}


def register(name: str) -> Callable[[Callable[..., Dataset]], Callable[..., Dataset]]:
  """Decorator: ``DATASETS[name] = loader``, so ``config.data.name = name`` loads with it. A
  config file may register its own loader before ``get_config()`` returns."""
  def add(loader: Callable[..., Dataset]) -> Callable[..., Dataset]:
    DATASETS[name] = loader
    return loader
  return add


def dataset_options(name: str) -> dict | None:
  """``{option: default}`` of dataset ``name``'s loader (``""`` for one without a default);
  None for an unknown name."""
  if name not in DATASETS:
    return None
  parameters = inspect.signature(DATASETS[name]).parameters.values()
  return {p.name: "" if p.default is inspect.Parameter.empty else p.default for p in parameters}


fjt_config.SWITCHABLE_GROUPS["data"] = dataset_options


def load_dataset(config: Mapping) -> Dataset:
  """Loads ``DATASETS[config["name"]]`` with the other keys as arguments."""
  config = dict(config)
  name = config.pop("name", None)
  if name not in DATASETS:
    raise ConfigError(f"config key 'data.name': unknown dataset {name!r}; known: {sorted(DATASETS)}")
  loader = DATASETS[name]
  accepted = inspect.signature(loader).parameters
  for key in config:
    if key not in accepted:
      raise ConfigError(f"config key 'data.{key}' is not an option of dataset {name!r}; known: {sorted(accepted)}")
  try:
    dataset = loader(**config)
  except ValueError as e:  # Loaders name the offending 'data.*' key.
    raise ConfigError(str(e)) from e
  if not isinstance(dataset, Dataset):
    raise ConfigError(f"dataset {name!r}: its loader returned {type(dataset).__name__}, "
                      "expected fjt.Dataset")
  return dataset


__all__ = ["DATASETS", "Dataset", "Sources", "baseline_lines", "batch_indices", "data_baselines",
           "dataset_vocabulary", "eval_batches", "get_batch", "load_dataset", "num_examples",
           "register", "steps_per_epoch"]
