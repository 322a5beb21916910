"""The activations of one forward pass: every module output and sown value of a Flax model,
captured in eval mode, with statistics (zeros, dead units, non-finite counts) and histograms."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from fjt.files import write_atomic
from fjt.summary import finite_stats, grid
from fjt.tree import path_str

PyTree = Any


@dataclasses.dataclass(frozen=True)
class ActivationRow:
  """One module output, or one value a model sowed into ``"intermediates"``, of a forward pass.

  ``path`` is the module's path (``Dense_0``, ``h_0/mlp/c_fc``) or the sown name under it
  (``relu_0``: fjt's models sow each ReLU output); ``(output)`` is the model's own output; a
  suffix ``[i]`` is the i-th call of a module called more than once. ``stats``: ``mean``,
  ``std``, ``min``, ``max`` of the finite values; ``zeros``, the fraction of elements exactly 0
  (after a ReLU: the inactive ones); ``dead``, the fraction of features (the last axis) that are
  0 for every example and position (dead ReLU units; NaN below 2 dims); ``nonfinite``, the count
  of NaN and Inf.
  """
  path: str
  shape: tuple[int, ...]
  dtype: str
  stats: dict[str, float]


def _walk_intermediates(node: Mapping, prefix: tuple[str, ...], out: dict[str, jax.Array]) -> None:
  for name, value in node.items():  # Insertion order: the order the values were computed.
    if isinstance(value, Mapping):
      _walk_intermediates(value, prefix + (name,), out)
      continue
    label = "/".join(prefix if name == "__call__" else prefix + (name,)) or "(output)"
    calls = value if isinstance(value, tuple) else (value,)
    for i, call in enumerate(calls):
      for keypath, leaf in jax.tree_util.tree_flatten_with_path(call)[0]:
        suffix = (f"[{i}]" if len(calls) > 1 else "") + (f"/{path_str(keypath)}" if keypath else "")
        out[label + suffix] = leaf


def capture(model: nn.Module, variables: Mapping[str, PyTree], batch) -> dict[str, np.ndarray]:
  """``{path: array}`` of every module output and sown ``"intermediates"`` value of one
  forward pass in eval mode, in the order they were computed (paths as ``ActivationRow``'s).

  ``batch`` is the model's input (an array or a dict of arrays), or a batch holding it under
  ``"x"``. The model is called with ``train=False`` if its ``__call__`` takes ``train``; no
  variable is updated.
  """
  from fjt.state import model_kwargs

  x = batch["x"] if isinstance(batch, Mapping) and "x" in batch else batch
  kwargs = model_kwargs(model, train=False)

  paths: list[str] = []  # Filled while tracing: jit would return the dicts in sorted key order.

  @jax.jit
  def forward(variables, x):
    _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"],
                           **kwargs)
    found: dict[str, jax.Array] = {}
    _walk_intermediates(state["intermediates"], (), found)
    paths.extend(found)
    return list(found.values())

  arrays = forward(dict(variables), x)
  return {p: np.asarray(a) for p, a in zip(paths, arrays)}


def activation_stats(x: np.ndarray) -> dict[str, float]:
  """``mean, std, min, max`` (finite values), ``zeros``, ``dead``, ``nonfinite`` of ``x``
  (see ``ActivationRow``)."""
  x = np.asarray(x)
  stats = finite_stats(x)
  nonfinite = stats.pop("nonfinite")
  stats["zeros"] = float(np.count_nonzero(x == 0) / x.size) if x.size else float("nan")
  stats["dead"] = (float(np.all(x == 0, axis=tuple(range(x.ndim - 1))).mean())
                   if x.ndim >= 2 and x.size else float("nan"))
  stats["nonfinite"] = nonfinite
  return stats


def activation_rows(captured: Mapping[str, np.ndarray]) -> list[ActivationRow]:
  return [ActivationRow(p, tuple(a.shape), a.dtype.name, activation_stats(a))
          for p, a in captured.items()]


def activations(model: nn.Module, variables: Mapping[str, PyTree], batch) -> list[ActivationRow]:
  """The activation table of one eval-mode forward pass of ``batch`` (see ``capture``)."""
  return activation_rows(capture(model, variables, batch))


def format_activations(rows: Sequence[ActivationRow]) -> str:
  keys = ("mean", "std", "min", "max", "zeros", "dead")
  body = [[r.path, str(r.shape), r.dtype, *(f"{r.stats[k]:.4g}" for k in keys),
           str(r.stats["nonfinite"])] for r in rows]
  return grid(["path", "shape", "dtype", *keys, "nonfinite"], body)


def plot_activations(captured: Mapping[str, np.ndarray], png_path: str, bins: int = 50) -> None:
  """One histogram of the finite values per captured array (log counts), 4 to a row."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  cols = min(4, max(len(captured), 1))
  rows = max(-(-len(captured) // cols), 1)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
  for ax in axes.flat[len(captured):]:
    ax.axis("off")
  for ax, (path, array) in zip(axes.flat, captured.items()):
    values = np.asarray(array, np.float64).ravel()
    ax.hist(values[np.isfinite(values)], bins=bins, log=True)
    ax.set_title(f"{path} {tuple(array.shape)}", fontsize=9)
  fig.tight_layout()
  try:
    write_atomic(png_path, lambda f: fig.savefig(f, dpi=100, format="png"))
  finally:
    plt.close(fig)


def validation_batch(config: ml_collections.ConfigDict, size: int) -> PyTree:
  """The first ``size`` inputs (an array, or a dict of arrays) of the validation split of
  ``config.data``."""
  from fjt.data import load_dataset

  if size < 1:
    raise ValueError(f"batch size must be positive, got {size}")
  return jax.tree.map(lambda v: v[:size], load_dataset(config.data).test["x"])
