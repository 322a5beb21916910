"""TIES-Merging (Yadav et al., 2023): trim each task vector, elect a sign, average the agreeing.

Per leaf, with task vectors ``tau_i = t_i - base`` and weights ``w_i`` (default 1)::

  kept_i  = tau_i on its top int(density * size) entries by magnitude, 0 elsewhere
  d_i     = w_i * kept_i
  elected = sign(sum_i d_i)
  agree_i = sign(d_i) == elected
  merged  = sum_i d_i agree_i / sum_i w_i agree_i      (a zero divisor counts as 1)
  result  = base + scale * merged

mergekit's ``ties`` with its default normalisation. Ties in magnitude go to the lower flat
index, as ``jax.lax.top_k`` and ``torch.topk`` order them, so exactly ``int(density * size)``
entries are kept. ``sign_elected_mean`` (the election and the disjoint mean) is shared with
DARE-TIES (``fjt.aggregate.dare``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fjt.aggregate.registry import aggregate_trees, register
from fjt.state import PyTree


def densities(density: float | Sequence[float], n: int) -> tuple[float, ...]:
  """``density`` for each of ``n`` models (one number for all, or one each), each in (0, 1]."""
  values = tuple(density) if isinstance(density, (tuple, list)) else (density,) * n
  if len(values) != n:
    raise ValueError(f"density has {len(values)} values for {n} models; give one or one each")
  for value in values:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
        or not 0 < value <= 1:
      raise ValueError(f"density is {value!r}; expected a fraction in (0, 1]")
  return tuple(float(v) for v in values)


def _kth_largest_bits(bits: jax.Array, k: jax.Array | int) -> jax.Array:
  """The ``k``-th largest of the unsigned integer vector ``bits`` (``1 <= k <= bits.size``): a
  radix select, two passes of 16-bit digit counts (four for 64 bits) instead of a sort; vectors
  of at most 2^16 entries, cheaper to sort than to count into 2^16 bins, are sorted."""
  if bits.size <= 1 << 16:
    return jnp.sort(bits)[bits.size - k]
  width = bits.dtype.itemsize * 8
  prefix = jnp.zeros((), bits.dtype)
  rank = jnp.asarray(k, jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)
  for shift in range(width - 16, -1, -16):
    # Among entries whose higher digits equal prefix's, count each value of this 16-bit digit.
    match = (bits >> (shift + 16)) == (prefix >> (shift + 16)) if shift + 16 < width else True
    digit = ((bits >> shift) & 0xFFFF).astype(jnp.int32)
    counts = jnp.zeros(1 << 16, rank.dtype).at[jnp.where(match, digit, 1 << 16)].add(
        1, mode="drop")
    above = jnp.cumsum(counts[::-1])[::-1]  # above[v]: entries with a digit >= v.
    chosen = jnp.sum(above >= rank) - 1  # The largest digit with at least `rank` at or above it.
    rank = rank - jnp.where(chosen + 1 < (1 << 16), above[jnp.minimum(chosen + 1, 0xFFFF)], 0)
    prefix = prefix | (chosen.astype(bits.dtype) << shift)
  return prefix


def kth_largest(a: jax.Array, k: jax.Array | int) -> jax.Array:
  """The ``k``-th largest value of the non-negative float vector ``a`` (``1 <= k <= a.size``).

  Non-negative floats order as their bit patterns read as unsigned integers, so this is
  ``_kth_largest_bits``'s radix select (0.5 s for GPT-2's 38.6M-entry embedding on a loaded
  2-core CPU, where a sort took 31 s).
  """
  unsigned = jnp.uint32 if a.dtype.itemsize == 4 else jnp.uint64
  return jax.lax.bitcast_convert_type(
      _kth_largest_bits(jax.lax.bitcast_convert_type(a, unsigned), k), a.dtype)


def top_magnitude(x: jax.Array, k: int) -> jax.Array:
  """Bool mask like ``x``: its ``k`` entries of largest ``|x|``; among equal magnitudes the
  lower flat indices are kept first, so exactly ``min(max(k, 0), x.size)`` entries are."""
  if k <= 0:
    return jnp.zeros(x.shape, bool)
  if k >= x.size:
    return jnp.ones(x.shape, bool)
  a = jnp.abs(x)
  threshold = kth_largest(a.ravel(), k)
  greater, equal = a > threshold, a == threshold
  need = k - jnp.sum(greater)  # >= 1 of the entries equal to the threshold are kept.
  index = jax.lax.broadcasted_iota(jnp.int32, (x.size,), 0).reshape(x.shape)

  def cutoff_of_ties() -> jax.Array:
    # The need-th smallest flat index among the equal entries, + 1: the need-th largest of
    # size - index over them (0 elsewhere), by the same radix select (ties are common: task
    # vectors of nearby weights are quantised by float rounding).
    keys = jnp.where(equal, x.size - index, 0).astype(jnp.uint32).ravel()
    return (x.size - _kth_largest_bits(keys, need).astype(jnp.int32)) + 1

  # A scalar from the branch, so the mask below stays one elementwise expression that XLA fuses
  # with what uses it (no bool array of the leaf is written).
  cutoff = jax.lax.cond(jnp.sum(equal) == need, lambda: jnp.int32(x.size), cutoff_of_ties)
  return greater | (equal & (index < cutoff))


def sign_elected_mean(d: Sequence[jax.Array], w: jax.Array) -> jax.Array:
  """TIES's election and disjoint mean of weighted task vectors ``d_i = w_i * tau_i``:
  ``sum_i d_i agree_i / sum_i w_i agree_i`` with ``agree_i = sign(d_i) == sign(sum_i d_i)``
  (a zero divisor counts as 1)."""
  elected = jnp.sign(functools.reduce(jnp.add, d))
  agree = [jnp.sign(d_i) == elected for d_i in d]
  numerator = functools.reduce(jnp.add, [jnp.where(a, d_i, 0) for a, d_i in zip(agree, d)])
  divisor = functools.reduce(jnp.add, [jnp.where(a, w[i], 0) for i, a in enumerate(agree)])
  return numerator / jnp.where(divisor == 0, 1, divisor)


@register("ties")
def ties_rule(x: jax.Array, w: jax.Array, *, base: jax.Array, density: float = 0.2,
              scale: float = 1.0) -> jax.Array:
  """TIES: top-density task vectors by magnitude, elected sign, disjoint weighted mean.

  ``x`` ``(N, ...)`` the models' leaf, ``w`` ``(N,)``, ``base`` ``(...)``, all in the
  accumulation dtype; ``density`` one fraction or one per model.
  """
  fractions = densities(density, x.shape[0])
  d = [w[i] * jnp.where(top_magnitude(x[i] - base, int(f * base.size)), x[i] - base, 0)
       for i, f in enumerate(fractions)]
  return base + scale * sign_elected_mean(d, w)


def ties(base: PyTree, trees: Sequence[PyTree], *, density: float | Sequence[float],
         weights: Sequence[float] | None = None, scale: float = 1.0,
         integer_policy: str = "max") -> PyTree:
  """TIES-merges ``trees`` fine-tuned from ``base`` (the module docstring's formula per leaf).

  Floating leaves are computed in float32 (float64 for float64) and cast back to their dtype;
  results keep the inputs' shardings. Integer leaves follow ``integer_policy`` over ``trees``
  as in ``fjt.aggregate.mean``. ``density``: a fraction in (0, 1], or one per tree.
  """
  density = tuple(density) if isinstance(density, (list, tuple)) else density
  return aggregate_trees("ties", trees, weights, integer_policy,
                         params={"density": density, "scale": float(scale)}, base=base)
