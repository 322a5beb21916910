"""Weight files <-> fjt checkpoints for the model of a config (``scripts/convert.py``)."""

from __future__ import annotations

import os

import jax

from fjt import checkpoint
from fjt.config import load_config
from fjt.interop import torch as interop
from fjt.models import CNN, create_model


def _example(config):
  from fjt.data import load_dataset
  return load_dataset(config.data).train["x"][:1]


def _nchw_flatten(model, example):
  """PyTorch flattens conv features as NCHW: the CNN's first Dense gets its rows permuted."""
  return interop.cnn_nchw_flatten(model, example.shape) if isinstance(model, CNN) else None


def import_weights(weights_path: str, out_dir: str, config_path: str) -> interop.ImportReport:
  """A ``.safetensors`` / ``.pt`` state_dict -> an fjt checkpoint (``{"params",
  "batch_stats"}``) for the model of ``config_path``, written to ``out_dir``. Strict: every
  variable of the model must get a value and every tensor (but ``num_batches_tracked``) a
  place, or ``interop.StateDictMismatch`` names them all."""
  try:
    state_dict = interop.load_file(weights_path)
  except OSError as e:  # A truncated file: torch says "[Errno 22] Invalid argument", no name.
    if e.filename is not None:
      raise
    raise ValueError(f"{weights_path}: cannot read the weights ({e.strerror or e}); the file is "
                     "damaged or not a PyTorch/safetensors file") from e
  config = load_config(config_path)
  model, example = create_model(config.model), _example(config)
  variables, report = interop.from_state_dict(state_dict, interop.abstract_variables(model, example),
                                              nchw_flatten=_nchw_flatten(model, example))
  checkpoint.save(out_dir, variables)
  return report


def export_weights(checkpoint_path: str, out_path: str, config_path: str | None = None) -> list[str]:
  """An fjt checkpoint's variables -> ``.safetensors`` / ``.pt`` with PyTorch keys and
  layouts. ``config_path`` (needed for the CNN) sets the NCHW flatten permutation.
  Returns the keys written."""
  variables = checkpoint.load_variables(checkpoint_path)
  nchw = None
  if config_path:
    config = load_config(config_path)
    nchw = _nchw_flatten(create_model(config.model), _example(config))
  state_dict = interop.to_state_dict(jax.device_get(variables), nchw_flatten=nchw)
  interop.save_file(state_dict, out_path)
  return list(state_dict)


def is_weights_file(path: str) -> bool:
  return os.fspath(path).endswith(interop.FILE_TYPES)
