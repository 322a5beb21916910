"""Flax Linen models and a name -> constructor registry."""

import dataclasses
from collections.abc import Callable, Mapping

import flax.linen as nn

from fjt.config import ConfigError
from fjt.models.cnn import CNN
from fjt.models.gpt import GPT
from fjt.models.mlp import MLP
from fjt.models.nnlm import NNLM

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "nnlm": NNLM,
    "gpt": GPT,
}


def create_model(config: Mapping) -> nn.Module:
  """Builds ``MODELS[config["name"]]`` with the other keys as attributes.

  ``config`` is ``config.model`` of an experiment, e.g.
  ``{"name": "mlp", "features": (128,), "num_classes": 10}``.
  """
  config = dict(config)
  name = config.pop("name", None)
  if name not in MODELS:
    raise ConfigError(f"config key 'model.name': unknown model {name!r}; known models: {sorted(MODELS)}")
  cls = MODELS[name]
  fields = {f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")}
  unknown = sorted(set(config) - fields)
  if unknown:
    raise ConfigError(
        f"config key 'model.{unknown[0]}' is not an attribute of {cls.__name__}; "
        f"known: {sorted(fields)}")
  return cls(**config)


__all__ = ["CNN", "GPT", "MLP", "MODELS", "NNLM", "create_model"]
