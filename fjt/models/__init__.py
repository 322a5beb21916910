"""Flax Linen models and a name -> constructor registry.

``MODELS`` maps ``config.model.name`` to a Linen module class (or any callable taking the
other keys of ``config.model``); ``register`` adds your own::

  @fjt.models.register("my_model")
  class MyModel(nn.Module):
    width: int = 64
    ...
"""

import dataclasses
from collections.abc import Callable, Mapping

import flax.linen as nn

from fjt import config as fjt_config
from fjt.config import ConfigError
from fjt.models.cnn import CNN
from fjt.models.gpt import GPT
from fjt.models.llama import Llama
from fjt.models.mlp import MLP
from fjt.models.nnlm import NNLM
from fjt.models.resnet import ResNet

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "nnlm": NNLM,
    "resnet": ResNet,
    "gpt": GPT,
    "llama": Llama,
}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
  """Decorator: ``MODELS[name] = cls``, so ``config.model.name = name`` builds it. A config
  file may register its own model before ``get_config()`` returns."""
  def add(cls: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    MODELS[name] = cls
    return cls
  return add


def model_options(name: str) -> dict | None:
  """``{attribute: default}`` of model ``name`` (a dataclass module's fields); None for an
  unknown name or a model that is not a dataclass."""
  cls = MODELS.get(name)
  if cls is None or not dataclasses.is_dataclass(cls):
    return None
  return {f.name: f.default for f in dataclasses.fields(cls)
          if f.init and f.name not in ("parent", "name") and f.default is not dataclasses.MISSING}


fjt_config.SWITCHABLE_GROUPS["model"] = model_options


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
  if dataclasses.is_dataclass(cls):
    fields = {f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")}
    unknown = sorted(set(config) - fields)
    if unknown:
      raise ConfigError(
          f"config key 'model.{unknown[0]}' is not an attribute of {cls.__name__}; "
          f"known: {sorted(fields)}")
  return cls(**config)


__all__ = ["CNN", "GPT", "Llama", "MLP", "MODELS", "NNLM", "ResNet", "create_model", "register"]
