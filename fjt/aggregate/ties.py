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

How the top entries are found (``top_magnitude_cut``), exactly and without a sort: magnitudes
are compared as the integers of their bit patterns, and each model's k-th largest is narrowed
down by counting passes (``_count_select``): one fused reduction over the base and all the
models' leaves counts, for a few thresholds per model, the entries at or above each. The first
thresholds come from a small sample, the next ones from interpolating the counts; every step
keeps only what the exact counts prove, so the guesses change the number of passes, never the
result. Entries tied with the k-th magnitude are then split by flat index in one more pass
(per-row counts). The merge itself is one fused elementwise pass over the inputs.
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


# ``_count_select``'s thresholds per model and pass: cuts into PIECES equal pieces, and NEAR, in
# standard deviations of the guessed crossing (SAMPLE: of a sample quantile, in the first pass).
# Five a pass measured fastest (0.90 s for GPT-2's leaves, 0.92 with four, 1.05 with eight).
PIECES = 2
NEAR = (-2, -1 / 2, 1 / 2, 2)
SAMPLE = (-2, -1, 0, 1, 2)
SPLITS = PIECES - 1 + len(NEAR)


def _signed(dtype: jnp.dtype) -> jnp.dtype:
  return jnp.int32 if jnp.dtype(dtype).itemsize == 4 else jnp.int64


def _key_top(dtype: jnp.dtype) -> int:
  """One above the largest ``magnitude_bits`` of a float ``dtype`` (its NaNs' key)."""
  return int(np.array(np.inf, dtype).view(_signed(dtype))) + 2


def magnitude_bits(tau: jax.Array) -> jax.Array:
  """``|tau|`` as signed integers of its width, in the same order: non-negative floats order as
  their bit patterns do (the sign bit is clear, so the integers are non-negative). NaNs, which
  finite inputs never make, all map to one key above infinity's. Signed, because a CPU's
  vector units compare signed integers in one instruction and unsigned ones in three."""
  top = _key_top(tau.dtype)
  return jnp.minimum(jax.lax.bitcast_convert_type(jnp.abs(tau), _signed(tau.dtype)), top - 1)


def _count_select(keys: Callable[[int], jax.Array], k: jax.Array, top: int, dtype: jnp.dtype,
                  first: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """For each of ``M = k.size`` key arrays ``keys(i)`` (integer ``dtype``, all in ``[0, top)``):
  its ``k[i]``-th largest key (``1 <= k[i] <= keys(i).size``), exactly, by counting.

  Each model keeps an interval ``[lo, hi)`` of key values with ``count(key >= lo) >= k`` and
  ``count(key >= hi) < k`` (true for ``[0, top)``). A pass counts, for ``SPLITS`` thresholds
  inside every model's interval, the keys at or above each, and the interval shrinks to the
  piece between the last threshold with ``>= k`` and the first with ``< k``. When ``hi = lo +
  1``, ``lo`` is the k-th largest key. The counts are exact integers, so the result is exact
  whatever the thresholds are; they only decide how fast the interval shrinks:

  * the first pass uses ``first`` ``(M, SPLITS)`` when given (guesses from a sample);
  * then ``PIECES - 1`` thresholds cut the interval evenly (so it at least halves, whatever the
    data) and ``NEAR`` ones sit around where the count would cross ``k`` if the keys in the
    interval were spread evenly between ``lo`` and ``hi`` (linear interpolation of the two
    counts), at 1/2 and 2 standard deviations of that guess either side: for smooth
    distributions of magnitudes the crossing falls between those, and E keys in the interval
    become about sqrt(E) / 2 in the next. Typically 4 to 6 passes in all (GPT-2's leaves).

  The loop ends when every interval is one key wide, and each pass shrinks it by at least one
  key (a threshold sits strictly inside while it is wider), so it always ends.

  A pass is one fused reduction over all M key arrays together (the keys are recomputed from
  their inputs, never stored); on a CPU it is several times cheaper than the scatter-add
  histogram of one array that a radix select needs.

  Returns ``(kth, at_least, above)``: the k-th largest keys (``(M,)`` of ``dtype``) and how many
  keys are ``>= kth`` and ``> kth`` (``(M,)`` int32).
  """
  m, q = k.shape[0], SPLITS
  rank = k.astype(jnp.int32)
  shape, size = keys(0).shape, keys(0).size

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

  def guesses(lo, hi, at_lo, at_hi):
    width = hi - lo
    # Equal pieces: the interval at least halves a pass whatever the data.
    even = [lo + (width // PIECES) * j + jnp.minimum(width % PIECES, j).astype(dtype)
            for j in range(1, PIECES)]
    # The others sit around where count(key >= t) would reach k if the E = at_lo - at_hi keys in
    # [lo, hi) were spread evenly, at multiples of the spread of that guess for keys spread
    # at random (the Brownian bridge's sigma: sqrt(E f (1 - f)) keys of E, f the fraction of
    # them below the crossing), so the crossing usually falls in a piece of about sigma.
    f32 = lambda v: v.astype(jnp.float32)
    inside = f32(at_lo - at_hi)
    below = (f32(at_lo - rank) + 0.5) / inside  # The fraction of them below the crossing.
    sigma = jnp.sqrt(below * (1 - below) / inside)
    # Offsets from lo (float32 holds those, not keys near 2^30, exactly enough), in [1, width].
    near = [jnp.clip(f32(width) * (below + sigma * o), 1, f32(width)).astype(dtype)
            for o in NEAR]
    near = [lo + jnp.clip(t, 1, width) for t in near]  # float32 rounding of wide intervals.
    return jnp.sort(jnp.stack(even + near, axis=1), axis=1)

  def step(state):
    lo, hi, at_lo, at_hi, thresholds = state
    counts = count(thresholds)
    # Counts fall as thresholds rise: the first s thresholds have at least `rank` keys above.
    s = jnp.sum(counts >= rank[:, None], axis=1)
    edges = jnp.concatenate([lo[:, None], thresholds, hi[:, None]], axis=1)
    tallies = jnp.concatenate([at_lo[:, None], counts, at_hi[:, None]], axis=1)
    pick = lambda a, i: jnp.take_along_axis(a, i[:, None], axis=1)[:, 0]
    lo, hi, at_lo, at_hi = pick(edges, s), pick(edges, s + 1), pick(tallies, s), pick(tallies, s + 1)
    return lo, hi, at_lo, at_hi, guesses(lo, hi, at_lo, at_hi)

  lo, hi = jnp.zeros(m, dtype), jnp.full(m, top, dtype)
  at_lo, at_hi = jnp.full(m, size, jnp.int32), jnp.zeros(m, jnp.int32)
  if first is None:
    first = guesses(lo, hi, at_lo, at_hi)
  first = jnp.clip(jnp.sort(first.astype(dtype), axis=1), lo[:, None] + 1, hi[:, None])
  lo, _, at_least, above, _ = jax.lax.while_loop(lambda s: jnp.any(s[1] - s[0] > 1), step,
                                                 (lo, hi, at_lo, at_hi, first))
  return lo, at_least, above


def _sample_guesses(keys: Callable[[int], jax.Array], k: Sequence[int], samples: int = 4096
                    ) -> jax.Array | None:
  """First thresholds for ``_count_select`` from a sample of each key array: ``samples`` entries
  at fixed, scattered positions (one in each of ``samples`` equal stretches of the flat array,
  at a hashed offset), sorted, read at the rank of the k-th largest and at ``SAMPLE`` standard
  deviations of that sample quantile either side (a wrong guess costs passes, not exactness).
  None for arrays too small to be worth it (their passes are cheap)."""
  key0 = keys(0)
  size = key0.size
  if size < 64 * samples:
    return None
  stretch = size // samples
  j = np.arange(samples, dtype=np.int64)
  positions = j * stretch + (j * 2654435761 + 12345) % stretch
  unravel = np.unravel_index(positions, key0.shape)
  rows = []
  for i, ki in enumerate(k):
    sample = jnp.sort(keys(i)[unravel])
    p = ki / size
    sigma = np.sqrt(samples * p * (1 - p)) + 1
    at = samples * (1 - p) + np.array(SAMPLE) * sigma
    rows.append(sample[np.clip(np.round(at), 0, samples - 1).astype(np.int32)])
  return jnp.stack(rows)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """The row-major flat index of each entry of an array of ``shape`` (int32), computed in place
  (an iota XLA fuses, never a stored array)."""
  index = jnp.zeros(shape, jnp.int32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.int32, shape, axis) * stride
    stride *= shape[axis]
  return index


def _rows(size: int, most: int = 4096) -> int:
  """Entries per row when a flat array of ``size`` is viewed as rows: its largest divisor up to
  ``most`` (1 for a prime size: still correct, only slower)."""
  return next(c for c in range(min(size, most), 0, -1) if size % c == 0)


def top_magnitude_cut(taus: Callable[[int], jax.Array], ks: Sequence[int]
                      ) -> tuple[jax.Array, jax.Array]:
  """Where each task vector ``taus(i)`` keeps its top ``ks[i]`` entries by magnitude (``1 <=
  ks[i] < size``; ties in magnitude to the lower flat index): ``(bits, cutoff)`` ``(M,)`` such
  that entry ``e`` is kept iff ``magnitude_bits(tau)[e] > bits`` or it equals ``bits`` and its
  flat index is below ``cutoff``.

  ``bits`` is the k-th largest magnitude key (``_count_select``, its first guesses from a
  sample). Of the entries equal to it, the first ``need = k - count(> bits)`` by flat index are
  kept: all of them when that is every one (no further pass), else the need-th one is found
  exactly in one more pass: the flat array is viewed as rows, one reduction counts each row's
  equal entries, a running sum over the rows finds the row holding the need-th, and a running
  sum over that one row finds its position. (Ties are common: task vectors of float32 weights
  are multiples of the base's rounding unit, so dozens of entries share the k-th magnitude.)
  """
  tau0 = taus(0)
  dtype, size, m = _signed(tau0.dtype), tau0.size, len(ks)
  k = jnp.asarray(ks, jnp.int32)
  bits_of = lambda i: magnitude_bits(taus(i))
  bits, at_least, above = _count_select(bits_of, k, _key_top(tau0.dtype), dtype,
                                        _sample_guesses(bits_of, ks))
  need = k - above  # >= 1 of the entries equal to bits are kept.

  def cutoff_of_ties() -> jax.Array:
    width = _rows(size)
    rows = lambda i: bits_of(i).reshape(size // width, width) == bits[i]
    ops = tuple(rows(i).astype(jnp.int32) for i in range(m))
    per_row = jax.lax.reduce(ops, (jnp.int32(0),) * m,
                             lambda a, b: tuple(x + y for x, y in zip(a, b)), (1,))
    before = jnp.cumsum(jnp.stack(per_row), axis=1)  # (M, rows): equal entries up to a row.
    row = jnp.sum(before < need[:, None], axis=1)  # The row holding the need-th equal entry.
    earlier = jnp.where(row > 0, jnp.take_along_axis(before, jnp.maximum(row - 1, 0)[:, None],
                                                     axis=1)[:, 0], 0)
    cutoffs = []
    for i in range(m):
      inside = jnp.cumsum(jax.lax.dynamic_index_in_dim(rows(i), row[i], keepdims=False))
      column = jnp.sum(inside < need[i] - earlier[i])
      cutoffs.append(row[i] * width + column + 1)
    # Models without a partial tie keep every equal entry: a cutoff of size does.
    return jnp.where(at_least - above == need, size, jnp.stack(cutoffs).astype(jnp.int32))

  cutoff = jax.lax.cond(jnp.all(at_least - above == need),
                        lambda: jnp.full(k.shape, size, jnp.int32), cutoff_of_ties)
  return bits, cutoff


def kth_largest(a: jax.Array, k: jax.Array | int) -> jax.Array:
  """The ``k``-th largest value of the non-negative float array ``a`` (``1 <= k <= a.size``),
  exactly, by ``_count_select`` on its bit patterns (non-negative floats order as those do)."""
  bits, _, _ = _count_select(lambda i: magnitude_bits(a), jnp.reshape(jnp.asarray(k), (1,)),
                             _key_top(a.dtype), _signed(a.dtype))
  return jax.lax.bitcast_convert_type(bits[0], a.dtype)


def _kept(tau: jax.Array, bits: jax.Array, cutoff: jax.Array) -> jax.Array:
  """``top_magnitude_cut``'s mask for one task vector: one elementwise expression, which XLA
  fuses with what uses it (no bool array of the leaf is written)."""
  key = magnitude_bits(tau)
  return (key > bits) | ((key == bits) & (_flat_index(tau.shape) < cutoff))


def top_magnitudes(taus: Callable[[int], jax.Array], ks: Sequence[int]) -> list[jax.Array]:
  """Bool masks like each ``taus(i)``: its ``ks[i]`` entries of largest magnitude (among equal
  magnitudes the lower flat indices first, so exactly ``min(max(k, 0), size)`` entries). The
  arrays keeping some but not all entries share ``top_magnitude_cut``'s counting passes."""
  size = taus(0).size
  partial = [i for i, k in enumerate(ks) if 0 < k < size]
  if partial:
    bits, cutoff = top_magnitude_cut(lambda j: taus(partial[j]), [ks[i] for i in partial])
  masks = []
  for i, k in enumerate(ks):
    shape = taus(i).shape
    if k <= 0:
      masks.append(jnp.zeros(shape, bool))
    elif k >= size:
      masks.append(jnp.ones(shape, bool))
    else:
      j = partial.index(i)
      masks.append(_kept(taus(i), bits[j], cutoff[j]))
  return masks


def top_magnitude(x: jax.Array, k: int) -> jax.Array:
  """Bool mask like ``x``: its ``k`` entries of largest ``|x|`` (``top_magnitudes`` of one)."""
  return top_magnitudes(lambda i: x, [k])[0]


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
  # The task vectors are recomputed where used (XLA fuses them), never stored; the models
  # share the counting passes (one read of base).
  tau = lambda i: x[i] - base
  kept = top_magnitudes(tau, [int(f * base.size) for f in fractions])
  d = [w[i] * jnp.where(mask, tau(i), 0) for i, mask in enumerate(kept)]
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
