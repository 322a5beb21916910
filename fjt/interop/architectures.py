"""The registry of Hugging Face architectures (``config.json``'s ``model_type`` -> four
functions), kept apart from ``fjt.interop.hf`` so that ``fjt.interop.torch``'s errors can name
the supported types without importing it. ``fjt.interop.hf`` registers GPT-2 and Llama and
documents the four functions; ``fjt`` imports it, so the registry is filled on ``import fjt``."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import numpy as np

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Architecture:
  """A registered Hugging Face architecture (see the module docstring)."""
  model_type: str
  module_from_config: Callable[[dict], nn.Module]
  config_from_module: Callable[[nn.Module], dict]
  variables_from_state_dict: Callable[[dict[str, np.ndarray], nn.Module], PyTree]
  state_dict_from_variables: Callable[[PyTree, nn.Module], dict[str, np.ndarray]]
  buffers: tuple[str, ...] = ()
  base_prefix: str = "transformer."
  module_class: type | None = None


ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(model_type: str, *, module_from_config, config_from_module,
                          variables_from_state_dict, state_dict_from_variables,
                          buffers: Sequence[str] = (), base_prefix: str = "transformer.",
                          module_class: type | None = None) -> None:
  """Registers the Hugging Face ``model_type`` (``config.json``'s) for ``from_pretrained``
  and ``save_pretrained``. ``buffers``: regular expressions (``re.fullmatch`` on keys without
  ``base_prefix``) of tensors that are not weights, dropped on import; ``base_prefix``: the
  head model's prefix of the base model's keys, stripped on import; ``module_class``: the fjt
  module class ``save_pretrained`` exports as this type (None: the one whose
  ``config_from_module`` accepts the module)."""
  for pattern in buffers:
    re.compile(pattern)  # Fails now, not at import time.
  ARCHITECTURES[model_type] = Architecture(
      model_type, module_from_config, config_from_module, variables_from_state_dict,
      state_dict_from_variables, tuple(buffers), base_prefix, module_class)


def supported() -> list[str]:
  """The registered ``model_type``s, sorted."""
  return sorted(ARCHITECTURES)
