"""Tensor layouts: how a PyTorch tensor's axes map onto a Flax leaf's, and back.

A layout names the PyTorch side; every conversion is a transpose and a row-major reshape, so
export is the exact inverse of import:

  "linear"  nn.Linear.weight (out, in)             -> kernel (in, out), then reshaped to the
            leaf (e.g. DenseGeneral's (in, heads, head_dim)); with ``chw`` the rows are
            permuted from PyTorch's (C, H, W) flatten to Flax's (H, W, C).
  "conv"    nn.ConvNd.weight (out, in, *spatial)   -> kernel (*spatial, in, out)
  "as_is"   Hugging Face Conv1D.weight (in, out), Embedding.weight, norms, biases: the same
            axes, reshaped to the leaf.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

LAYOUTS = ("linear", "conv", "as_is")

Shape = tuple[int, ...]
Chw = tuple[int, int, int]


def check(layout: str, where: str) -> str:
  if layout not in LAYOUTS:
    raise ValueError(f"{where}: unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
  return layout


def flax_axes(value: np.ndarray, layout: str, chw: Chw | None = None) -> np.ndarray:
  """``value`` with its axes in Flax order, before any reshape (a view where possible)."""
  if layout == "linear":
    if value.ndim != 2:
      raise ValueError(f"layout 'linear' takes a 2-D (out, in) tensor, got shape {value.shape}")
    value = value.T
    if chw is not None:
      c, h, w = chw
      value = value.reshape(c, h, w, value.shape[1]).transpose(1, 2, 0, 3).reshape(c * h * w, -1)
    return value
  if layout == "conv":
    if value.ndim < 3:
      raise ValueError(f"layout 'conv' takes an (out, in, *spatial) tensor, got shape {value.shape}")
    return value.transpose((*range(2, value.ndim), 1, 0))
  return value


def torch_shape(layout: str, shape: Sequence[int]) -> Shape:
  """The PyTorch tensor shape whose ``flax_axes`` is ``shape`` (no reshape)."""
  shape = tuple(shape)
  if layout == "linear" and len(shape) == 2:
    return shape[::-1]
  if layout == "conv" and len(shape) >= 3:
    return (shape[-1], shape[-2], *shape[:-2])
  return shape


def to_flax(value: np.ndarray, layout: str, shape: Sequence[int], reshape: bool,
            chw: Chw | None = None) -> np.ndarray | None:
  """``value`` in the Flax leaf's layout and ``shape``, or None if it does not fit.

  Without ``reshape`` the axes must land on ``shape`` exactly; with it (explicit rules) a
  row-major reshape of the same size is allowed too."""
  try:
    out = flax_axes(value, layout, chw)
  except ValueError:
    return None
  if out.shape == tuple(shape):
    return out
  if reshape and out.size == math.prod(shape):
    return out.reshape(shape)
  return None


def to_torch(value: np.ndarray, layout: str, shape: Sequence[int],
             chw: Chw | None = None) -> np.ndarray:
  """The inverse of ``to_flax``: a Flax leaf back to the PyTorch tensor of ``shape``."""
  shape = tuple(shape)
  if layout == "linear":
    out, inp = shape
    value = value.reshape(inp, out)
    if chw is not None:
      c, h, w = chw
      value = value.reshape(h, w, c, out).transpose(2, 0, 1, 3).reshape(inp, out)
    return value.T
  if layout == "conv":
    value = value.reshape((*shape[2:], shape[1], shape[0]))
    return value.transpose((value.ndim - 1, value.ndim - 2, *range(value.ndim - 2)))
  return value.reshape(shape)
