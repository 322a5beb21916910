"""Weight files: ``.safetensors`` and weights-only ``.pt`` / ``.pth`` / ``.bin`` (PyTorch's
``torch.save`` under Hugging Face's name ``pytorch_model.bin``), numpy <-> torch tensors.

PyTorch is imported only by the functions that make or read torch tensors.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_dtypes
import numpy as np

from fjt.tree import flatten

PyTree = Any

FILE_TYPES = (".safetensors", ".pt", ".pth", ".bin")

# Torch dtypes numpy lacks: (torch dtype name, ml_dtypes type, integer type of the same width).
_BIT_CAST = (("bfloat16", ml_dtypes.bfloat16, np.int16),
             ("float8_e4m3fn", ml_dtypes.float8_e4m3fn, np.uint8),
             ("float8_e5m2", ml_dtypes.float8_e5m2, np.uint8))


class WeightFileError(ValueError):
  """A weight file that cannot be read as one: truncated, oversized, corrupt or not weights-only.
  The message is one line that names the file and what is wrong."""


class SortedStateDict(dict):
  """A state_dict whose key order is not the source model's: ``load_file`` of a
  ``.safetensors`` file (the format stores keys sorted). ``from_state_dict`` never matches
  such a source by order. A pytree like a dict."""


jax.tree_util.register_pytree_with_keys(
    SortedStateDict,
    lambda d: ([(jax.tree_util.DictKey(k), d[k]) for k in sorted(d)], tuple(sorted(d))),
    lambda keys, values: SortedStateDict(zip(keys, values)))


def to_torch(arrays: Mapping[str, Any]) -> dict[str, Any]:
  """``{key: torch.Tensor}`` on the CPU with the same bits and dtypes (bfloat16 included).

  For ``module.load_state_dict(to_torch(to_state_dict(variables)))``; needs PyTorch.
  """
  torch = import_torch()
  return {key: _to_tensor(torch, value) for key, value in arrays.items()}


def load_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a weight file into ``{key: numpy array}``.

  ``.safetensors`` (via ``safetensors.numpy``, no PyTorch needed): a ``SortedStateDict``, keys
  in natural order (``features.4`` before ``features.10``), since the format stores them
  sorted and keeps no order of its own (so ``from_state_dict`` matches it by name, never by
  order);
  bfloat16 arrives as ``ml_dtypes.bfloat16``, float8 dtypes are not readable by
  ``safetensors.numpy``. A tree saved by ``save_file`` has '/'-joined keys:
  ``fjt.tree.unflatten(load_file(path))`` rebuilds it.

  ``.pt`` / ``.pth`` / ``.bin``: ``torch.load(path, weights_only=True, map_location="cpu")`` and nothing
  else: never a full unpickle, which can run arbitrary code. The file must hold a flat
  mapping of name -> tensor, e.g. ``torch.save(module.state_dict(), path)``; its order is kept.

  Raises:
    WeightFileError (a ValueError): a truncated, oversized or corrupt file, a ``.pt`` file that
      needs more than weights-only unpickling, or one that is not a mapping of tensors. The
      message is one line and names the file.
    ValueError: an unknown extension.
    ImportError: a ``.pt`` file without PyTorch installed.
  """
  suffix = _file_type(path)
  if suffix == ".safetensors":
    import safetensors.numpy
    try:
      arrays = safetensors.numpy.load_file(path)
    except safetensors.SafetensorError as e:
      raise WeightFileError(f"{os.fspath(path)!r} is not a readable .safetensors file "
                            f"(truncated, oversized or corrupt): {_one_line(e)}") from e
    return SortedStateDict((key, arrays[key]) for key in sorted(arrays, key=natural_key))
  torch = import_torch()
  try:
    obj = torch.load(path, weights_only=True, map_location="cpu")
  except pickle.UnpicklingError as e:
    detail = next((line.strip() for line in str(e).splitlines() if "WeightsUnpickler" in line), "")
    raise WeightFileError(
        f"{os.fspath(path)!r} is not a weights-only PyTorch file, and only weights-only files "
        f"are accepted: its pickle needs objects other than tensors and plain containers, and "
        f"unpickling those can run arbitrary code. Re-save it as torch.save(module.state_dict()) "
        f"or as .safetensors. {detail}".rstrip()) from e
  except OSError:
    raise
  except (RuntimeError, EOFError, ValueError) as e:  # torch's zip reader on a cut file.
    raise WeightFileError(f"{os.fspath(path)!r} is not a readable PyTorch file (truncated or "
                          f"corrupt): {_one_line(e)}") from e
  if not isinstance(obj, Mapping):
    raise WeightFileError(f"{os.fspath(path)!r}: expected a state_dict (a mapping name -> tensor), "
                          f"found a {type(obj).__name__}")
  for key, value in obj.items():
    if not isinstance(value, torch.Tensor):
      raise WeightFileError(
          f"{os.fspath(path)!r}: expected a state_dict (a mapping name -> tensor), but key "
          f"{key!r} holds a {type(value).__name__}; top-level keys: {list(obj)[:10]}")
  return {str(key): _to_numpy(value) for key, value in obj.items()}


def natural_key(name: str) -> list:
  """Sorts 'Dense_2' before 'Dense_10' and 'features.4' before 'features.10'."""
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _one_line(error: BaseException) -> str:
  return " ".join(str(error).split()) or type(error).__name__


def save_file(tree: PyTree, path: str | os.PathLike) -> None:
  """Writes a flat ``{key: array}`` or a nested tree of arrays to ``path``, atomically.

  A flat mapping (e.g. ``to_state_dict``'s result) keeps its keys and order; nested mappings
  and other pytrees are flattened to '/'-joined paths (``params/Dense_0/kernel``). Values may
  be numpy, jax or torch arrays; dtypes and bits are kept, bfloat16 included. The file is
  written next to ``path`` under a temporary name and renamed, so it is never half-written.

  ``.safetensors`` needs no PyTorch; ``.pt`` / ``.pth`` is ``torch.save`` of a dict of CPU
  tensors, readable by ``torch.load(path, weights_only=True)``.
  """
  suffix = _file_type(path)
  if isinstance(tree, Mapping) and not any(isinstance(v, Mapping) for v in tree.values()):
    flat = dict(tree)
  else:
    flat = flatten(tree)
  for key in flat:
    if not isinstance(key, str):
      raise ValueError(f"save_file {os.fspath(path)!r}: keys must be strings, got {key!r}")
  arrays = {key: np.asarray(_to_numpy(value), order="C") for key, value in flat.items()}
  if suffix == ".safetensors":
    import safetensors.numpy
    _write_atomically(path, lambda tmp: safetensors.numpy.save_file(arrays, tmp))
  else:
    torch = import_torch()
    tensors = {key: _to_tensor(torch, value) for key, value in arrays.items()}
    _write_atomically(path, lambda tmp: torch.save(tensors, tmp))


def import_torch(needs: str = "fjt.interop.torch needs PyTorch for torch tensors and .pt files"):
  """Imports PyTorch, or raises ImportError: ``needs`` (who needs it, for what), then how to
  install it."""
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"{needs}: install the torch extra with `pip install -e '.[torch]'`") from e
  return torch


def _is_torch_tensor(value: Any) -> bool:
  # Checked by type name so that numpy-only callers never import torch.
  return type(value).__module__.split(".")[0] == "torch" and hasattr(value, "detach")


def _to_numpy(value: Any) -> np.ndarray:
  """A numpy array with the same bits; for torch tensors it may share their memory."""
  if not _is_torch_tensor(value):
    return np.asarray(value)
  torch = import_torch()
  tensor = value.detach().cpu()
  for name, np_dtype, int_dtype in _BIT_CAST:
    if tensor.dtype == getattr(torch, name, None):
      return tensor.view(getattr(torch, np.dtype(int_dtype).name)).numpy().view(np_dtype)
  return tensor.numpy()


def _to_tensor(torch, value: Any):
  array = np.asarray(_to_numpy(value), order="C")
  if not array.flags.writeable:  # torch.from_numpy warns on read-only memory; copy instead.
    array = array.copy()
  for name, np_dtype, int_dtype in _BIT_CAST:
    if array.dtype == np_dtype:
      return torch.from_numpy(array.view(int_dtype)).view(getattr(torch, name))
  return torch.from_numpy(array)


def _file_type(path: str | os.PathLike) -> str:
  suffix = os.path.splitext(os.fspath(path))[1].lower()
  if suffix not in FILE_TYPES:
    raise ValueError(f"{os.fspath(path)!r}: unknown weight file type {suffix or '(no extension)'!r}; "
                     f"supported: {', '.join(FILE_TYPES)}")
  return suffix


def _write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
  path = os.fspath(path)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-",
                             suffix=os.path.splitext(path)[1])
  os.close(fd)
  try:
    write(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
