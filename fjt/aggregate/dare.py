"""DARE (Yu et al., 2024): drop task-vector entries at random, rescale the rest, then merge.

Per leaf, with task vectors ``tau_i = t_i - base`` and weights ``w_i`` (default 1)::

  mask_i = Bernoulli(density_i) per entry, key fold_in(fold_in(key(seed), leaf_id), i)
  r_i    = mask_i * tau_i / density_i
  merged = sum_i w_i r_i / sum_i w_i                 (consensus=None: DARE-linear)
         = TIES's sign_elected_mean of d_i = w_i r_i  (consensus="sum": DARE-TIES)
  result = base + merged

``leaf_id`` is the CRC-32 of the leaf's path (``fjt.aggregate.leaf_id``) and ``i`` the model's
position, so every model and leaf has its own stream, the same in memory, streamed from disk in
groups of leaves, or over a stacked axis: a seed reproduces a merge exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from fjt.aggregate.leaves import _divide
from fjt.aggregate.registry import aggregate_trees, register
from fjt.aggregate.ties import densities, sign_elected_mean
from fjt.state import PyTree

CONSENSUS = (None, "sum")


def dare_mask(seed: int, leaf_id: int, model: int, shape: tuple[int, ...], density: float
              ) -> jax.Array:
  """DARE's keep mask of model ``model`` at leaf ``leaf_id``: each entry True with probability
  ``density``, from ``fold_in(fold_in(jax.random.key(seed), leaf_id), model)``."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), leaf_id), model)
  return jax.random.bernoulli(key, density, shape)


def _dare(x: jax.Array, w: jax.Array, base: jax.Array, leaf_id: int, density, seed: int,
          consensus: str | None) -> jax.Array:
  if consensus not in CONSENSUS:
    raise ValueError(f"consensus is {consensus!r}; expected one of {CONSENSUS}")
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise ValueError(f"seed is {seed!r}; expected an int")
  d = []
  for i, f in enumerate(densities(density, x.shape[0])):
    tau = x[i] - base
    d.append(w[i] * jnp.where(dare_mask(seed, leaf_id, i, base.shape, f), _divide(tau, f), 0))
  if consensus is None:
    return base + _divide(functools.reduce(jnp.add, d), jnp.sum(w))
  return base + sign_elected_mean(d, w)


@register("dare")
def dare_rule(x: jax.Array, w: jax.Array, *, base: jax.Array, leaf_id: int,
              density: float = 0.2, seed: int = 0, consensus: str | None = None) -> jax.Array:
  """DARE: random drop at 1 - density, rescale by 1/density, weighted mean (or consensus="sum").

  ``x`` ``(N, ...)``, ``w`` ``(N,)``, ``base`` ``(...)`` in the accumulation dtype.
  """
  return _dare(x, w, base, leaf_id, density, seed, consensus)


@register("dare_ties")
def dare_ties_rule(x: jax.Array, w: jax.Array, *, base: jax.Array, leaf_id: int,
                   density: float = 0.2, seed: int = 0) -> jax.Array:
  """DARE-TIES: DARE's random drop and rescale, then TIES's sign election and disjoint mean."""
  return _dare(x, w, base, leaf_id, density, seed, "sum")


def dare(base: PyTree, trees: Sequence[PyTree], *, density: float | Sequence[float], seed: int,
         weights: Sequence[float] | None = None, consensus: str | None = None,
         integer_policy: str = "max") -> PyTree:
  """DARE-merges ``trees`` fine-tuned from ``base`` (the module docstring's formula per leaf).

  Floating leaves are computed in float32 (float64 for float64) and cast back; results keep the
  inputs' shardings; integer leaves follow ``integer_policy`` over ``trees``. ``density``: a
  fraction in (0, 1] or one per tree; ``consensus``: None (DARE-linear) or ``"sum"``
  (DARE-TIES).
  """
  density = tuple(density) if isinstance(density, (list, tuple)) else density
  return aggregate_trees("dare", trees, weights, integer_policy, base=base,
                         params={"density": density, "seed": int(seed), "consensus": consensus})
