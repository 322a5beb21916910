"""Real datasets that need no network, and deterministic batching."""

import inspect
from collections.abc import Mapping

from fjt.config import ConfigError
from fjt.data import digits, text, tokens
from fjt.data.batching import batch_indices, eval_batches, get_batch, steps_per_epoch
from fjt.data.dataset import Dataset

DATASETS = {"digits": digits.load, "text": text.load, "tokens": tokens.load}


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
    return loader(**config)
  except ValueError as e:  # Loaders name the offending 'data.*' key.
    raise ConfigError(str(e)) from e


__all__ = ["DATASETS", "Dataset", "batch_indices", "eval_batches", "get_batch",
           "load_dataset", "steps_per_epoch"]
