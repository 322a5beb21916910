"""Robust aggregates: coordinate-wise median and trimmed mean (rules ``median``, ``trimmed_mean``).

Both sort the N values of each coordinate and average the middle ones, ignoring the weights: an
outlier (a diverged or malicious replica) moves them at most to a neighbouring value. Inputs
with NaN/Inf are an error or skipped (``on_nonfinite``) before sorting.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fjt.aggregate.leaves import _divide
from fjt.aggregate.registry import aggregate_trees, register
from fjt.state import PyTree


def mean_of_middle(x: jax.Array, k: int) -> jax.Array:
  """Per coordinate of ``x`` ``(N, ...)``: sort the N values, drop ``k`` at each end, mean of
  the remaining ``N - 2k``."""
  kept = jnp.sort(x, axis=0)[k:x.shape[0] - k]
  return _divide(jnp.sum(kept, axis=0), kept.shape[0])


def trim_count(trim: float | int, n: int | None = None) -> int:
  """``k``, the values dropped at each end of ``n``: ``floor(trim * n)`` for a fraction ``trim``
  in [0, 0.5), ``trim`` itself for an int count. Raises unless ``2k < n``; with ``n`` None only
  checks ``trim`` (and returns 0)."""
  if isinstance(trim, (bool, np.bool_)) or not isinstance(trim, (int, float, np.integer,
                                                                  np.floating)):
    raise TypeError(f"trim must be a fraction in [0, 0.5) or an int count, got {trim!r}")
  if isinstance(trim, (int, np.integer)):
    if trim < 0:
      raise ValueError(f"trim is {trim}; a count must be >= 0")
  elif not 0 <= trim < 0.5:
    raise ValueError(f"trim is {trim}; a fraction must be in [0, 0.5)")
  if n is None:
    return 0
  k = int(trim) if isinstance(trim, (int, np.integer)) else int(np.floor(trim * n))
  if 2 * k >= n:
    raise ValueError(f"trim drops {k} values at each end of {n}; nothing would be left")
  return k


@register("median")
def median_rule(x: jax.Array, w: jax.Array) -> jax.Array:
  """Coordinate-wise median (for even N the mean of the two middle values); weights unused."""
  del w
  return mean_of_middle(x, (x.shape[0] - 1) // 2)


@register("trimmed_mean", aliases=("trimmed",))
def trimmed_mean_rule(x: jax.Array, w: jax.Array, *, trim: float | int = 0.1) -> jax.Array:
  """Coordinate-wise mean without the k = floor(trim * N) lowest and highest; weights unused.

  ``trim``: a fraction in [0, 0.5), or an int count k with 2k < N.
  """
  del w
  return mean_of_middle(x, trim_count(trim, x.shape[0]))


def median(trees: Sequence[PyTree], integer_policy: str = "max",
           on_nonfinite: str = "error") -> PyTree:
  """Coordinate-wise median of N pytrees; for even N the mean of the two middle values.

  Sorts the N values of each coordinate in float32 (float64 for float64 leaves) and casts back;
  memory is N times the largest leaf. Validation, integer leaves and NaN/Inf handling as ``mean``.
  """
  return aggregate_trees("median", trees, None, integer_policy, on_nonfinite)


def trimmed_mean(trees: Sequence[PyTree], trim: float | int, integer_policy: str = "max",
                 on_nonfinite: str = "error") -> PyTree:
  """Coordinate-wise trimmed mean: per coordinate, sort the N values, drop k at each end, and
  average the remaining N - 2k in float32 (float64 for float64 leaves).

  ``trim`` is a fraction in [0, 0.5), giving ``k = floor(trim * N)``, or an int count k with
  ``2k < N``. ``trim=0`` is the plain mean; the largest k is the median. Validation, integer
  leaves and NaN/Inf handling as ``mean`` (N counts the inputs left after skipping).
  """
  trim_count(trim)
  return aggregate_trees("trimmed_mean", trees, None, integer_policy, on_nonfinite,
                         params={"trim": trim})
