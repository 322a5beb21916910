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
from collections.abc import Callable, Sequence

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


SPLITS = 8  # Thresholds per model and pass of ``_count_select``: 9-way splits, ~3.2 bits a pass.


def _unsigned(dtype: jnp.dtype) -> jnp.dtype:
  return jnp.uint32 if jnp.dtype(dtype).itemsize == 4 else jnp.uint64


def magnitude_bits(tau: jax.Array) -> jax.Array:
  """``|tau|`` as unsigned integers of its width: non-negative floats order as their bit
  patterns do, and every pattern is below ``2^(width-1)`` (the sign bit is clear)."""
  return jax.lax.bitcast_convert_type(jnp.abs(tau), _unsigned(tau.dtype))


def _count_select(keys: Callable[[int], jax.Array], k: jax.Array, top: int, dtype: jnp.dtype
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """For each of ``M = k.size`` key arrays ``keys(i)`` (unsigned ``dtype``, all below ``top``):
  its ``k[i]``-th largest key (``1 <= k[i] <= keys(i).size``), exactly, by counting.

  Each model keeps an interval ``[lo, hi)`` of key values with ``count(key >= lo) >= k`` and
  ``count(key >= hi) < k`` (true for ``[0, top)``); a pass counts, for ``SPLITS`` thresholds
  spread evenly inside the interval, the keys at or above each, and the interval shrinks to the
  sub-interval between the last threshold with ``>= k`` and the first with ``< k``. When
  ``hi = lo + 1``, ``lo`` is the k-th largest key. Counts are exact integers, so the result is
  exact whatever the data; only the number of passes (``log_9`` of the key range, 10 for
  float32's 31 bits) depends on it. A pass is one fused, memory-bound reduction over all M key
  arrays together (keys are recomputed from their inputs, never stored), which XLA runs several
  times faster on a CPU than a scatter-add histogram of one array.

  Returns ``(kth, at_least, above)``: the k-th largest keys (``(M,)`` of ``dtype``) and how many
  keys are ``>= kth`` and ``> kth`` (``(M,)`` int32).
  """
  m, q = k.shape[0], SPLITS
  rank = k.astype(jnp.int32)
  size = keys(0).size
  shape = keys(0).shape

  def count(thresholds: jax.Array) -> jax.Array:
    # (M, q) counts of key >= threshold in one variadic reduction (one pass over the inputs).
    ops = []
    for i in range(m):
      key = keys(i)
      ops += [(key >= thresholds[i, j]).astype(jnp.int32) for j in range(q)]
    sums = jax.lax.reduce(tuple(ops), (jnp.int32(0),) * len(ops),
                          lambda a, b: tuple(x + y for x, y in zip(a, b)),
                          tuple(range(len(shape))))
    return jnp.stack(sums).reshape(m, q)

  def step(state):
    lo, hi, at_lo, at_hi = state
    width = hi - lo
    part, rest = width // (q + 1), width % (q + 1)
    j = jnp.arange(1, q + 1, dtype=dtype)
    # lo < thresholds <= hi, non-decreasing: lo + j * width / (q + 1) without overflow.
    thresholds = lo[:, None] + j * part[:, None] + jnp.minimum(j, rest[:, None])
    counts = count(thresholds)
    # Counts fall as thresholds rise: the first s thresholds have at least `rank` keys above.
    s = jnp.sum(counts >= rank[:, None], axis=1)
    edges = jnp.concatenate([lo[:, None], thresholds, hi[:, None]], axis=1)
    tallies = jnp.concatenate([at_lo[:, None], counts, at_hi[:, None]], axis=1)
    pick = lambda a, i: jnp.take_along_axis(a, i[:, None], axis=1)[:, 0]
    return pick(edges, s), pick(edges, s + 1), pick(tallies, s), pick(tallies, s + 1)

  init = (jnp.zeros(m, dtype), jnp.full(m, top, dtype), jnp.full(m, size, jnp.int32),
          jnp.zeros(m, jnp.int32))
  lo, _, at_least, above = jax.lax.while_loop(lambda s: jnp.any(s[1] - s[0] > 1), step, init)
  return lo, at_least, above


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """The row-major flat index of each entry of an array of ``shape`` (int32), computed in place
  (an iota XLA fuses, never a stored array)."""
  index = jnp.zeros(shape, jnp.int32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.int32, shape, axis) * stride
    stride *= shape[axis]
  return index


def top_magnitude_cut(taus: Callable[[int], jax.Array], ks: Sequence[int]
                      ) -> tuple[jax.Array, jax.Array]:
  """Where each task vector ``taus(i)`` keeps its top ``ks[i]`` entries by magnitude (``1 <=
  ks[i] < size``; ties in magnitude to the lower flat index): ``(bits, cutoff)`` ``(M,)`` such
  that entry ``e`` is kept iff ``magnitude_bits(tau)[e] > bits`` or it equals ``bits`` and its
  flat index is below ``cutoff``.

  ``bits`` is the k-th largest magnitude (``_count_select``). Of the entries equal to it, the
  first ``need = k - count(> bits)`` by index are kept: all of them when that is every one (the
  common case, no further pass), else ``cutoff`` is found by the same counting select on the key
  ``size - index`` over the equal entries (0 elsewhere): its need-th largest ``V`` is the need-th
  lowest index ``size - V``, so ``cutoff = size - V + 1``.
  """
  tau0 = taus(0)
  dtype, size = _unsigned(tau0.dtype), tau0.size
  k = jnp.asarray(ks, jnp.int32)
  top = 1 << (8 * jnp.dtype(dtype).itemsize - 1)
  bits, at_least, above = _count_select(lambda i: magnitude_bits(taus(i)), k, top, dtype)
  need = k - above  # >= 1 of the entries equal to bits are kept.

  def cutoff_of_ties() -> jax.Array:
    index = _flat_index(tau0.shape)
    keys = lambda i: jnp.where(magnitude_bits(taus(i)) == bits[i], size - index, 0
                               ).astype(jnp.uint32)
    v, _, _ = _count_select(keys, need, size + 1, jnp.uint32)
    # Models without a partial tie keep every equal entry: any cutoff > size - 1 does.
    return jnp.where(at_least - above == need, size, size - v.astype(jnp.int32) + 1)

  cutoff = jax.lax.cond(jnp.all(at_least - above == need),
                        lambda: jnp.full(k.shape, size, jnp.int32), cutoff_of_ties)
  return bits, cutoff


def kth_largest(a: jax.Array, k: jax.Array | int) -> jax.Array:
  """The ``k``-th largest value of the non-negative float array ``a`` (``1 <= k <= a.size``),
  exactly, by ``_count_select`` on its bit patterns (non-negative floats order as those do)."""
  dtype = _unsigned(a.dtype)
  top = 1 << (8 * jnp.dtype(dtype).itemsize - 1)
  bits, _, _ = _count_select(lambda i: jax.lax.bitcast_convert_type(a, dtype),
                             jnp.reshape(jnp.asarray(k), (1,)), top, dtype)
  return jax.lax.bitcast_convert_type(bits[0], a.dtype)


def _kept(tau: jax.Array, bits: jax.Array, cutoff: jax.Array) -> jax.Array:
  """``top_magnitude_cut``'s mask for one task vector: one elementwise expression, which XLA
  fuses with what uses it (no bool array of the leaf is written)."""
  key = magnitude_bits(tau)
  return (key > bits) | ((key == bits) & (_flat_index(tau.shape) < cutoff))


def top_magnitude(x: jax.Array, k: int) -> jax.Array:
  """Bool mask like ``x``: its ``k`` entries of largest ``|x|``; among equal magnitudes the
  lower flat indices are kept first, so exactly ``min(max(k, 0), x.size)`` entries are."""
  if k <= 0:
    return jnp.zeros(x.shape, bool)
  if k >= x.size:
    return jnp.ones(x.shape, bool)
  bits, cutoff = top_magnitude_cut(lambda i: x, [k])
  return _kept(x, bits[0], cutoff[0])


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
  ks = [int(f * base.size) for f in fractions]
  # Models keeping some but not all entries share the counting passes (one read of base).
  partial = [i for i, k in enumerate(ks) if 0 < k < base.size]
  if partial:
    bits, cutoff = top_magnitude_cut(lambda j: x[partial[j]] - base, [ks[i] for i in partial])
  d = []
  for i, k in enumerate(ks):
    tau = x[i] - base
    if k <= 0:
      kept = jnp.zeros(tau.shape, bool)
    elif k >= base.size:
      kept = jnp.ones(tau.shape, bool)
    else:
      j = partial.index(i)
      kept = _kept(tau, bits[j], cutoff[j])
    d.append(w[i] * jnp.where(kept, tau, 0))
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
