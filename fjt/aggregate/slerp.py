"""SLERP: spherical linear interpolation of two models, leaf by leaf (as mergekit's ``slerp``).

Per leaf, with ``a``, ``b`` flattened and ``cos = <a/|a|, b/|b|>`` (a zero leaf is not
normalised)::

  |cos| > 0.9995:  (1 - t) a + t b                                  (nearly colinear: linear)
  otherwise:       sin((1 - t) O) / sin O * a + sin(t O) / sin O * b,   O = arccos(cos)

on the original (unnormalised) leaves, in float32 (float64 for float64) and cast back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fjt.aggregate.registry import aggregate_trees, register
from fjt.state import PyTree

COLINEAR = 0.9995
_EPS = 1e-8


def _unit(v: jax.Array) -> jax.Array:
  norm = jnp.sqrt(jnp.sum(jnp.square(v)))
  return jnp.where(norm > _EPS, v / jnp.where(norm > _EPS, norm, 1), v)


@register("slerp")
def slerp_rule(x: jax.Array, w: jax.Array, *, t: float = 0.5) -> jax.Array:
  """SLERP of two models at t (0: the first, 1: the second); linear where |cos| > 0.9995.

  ``x`` ``(2, ...)`` in the accumulation dtype; the weights are unused.
  """
  del w
  if x.shape[0] != 2:
    raise ValueError(f"slerp interpolates 2 models, got {x.shape[0]}")
  a, b = x[0], x[1]
  cos = jnp.clip(jnp.sum(_unit(a) * _unit(b)), -1.0, 1.0)
  theta = jnp.arccos(cos)
  sin = jnp.sin(theta)
  safe = jnp.where(jnp.abs(cos) > COLINEAR, 1.0, sin)
  spherical = jnp.sin((1 - t) * theta) / safe * a + jnp.sin(t * theta) / safe * b
  return jnp.where(jnp.abs(cos) > COLINEAR, (1 - t) * a + t * b, spherical)


def slerp(a: PyTree, b: PyTree, t: float, integer_policy: str = "max") -> PyTree:
  """SLERP of two trees of one structure at ``t`` (the module docstring's formula per leaf);
  integer leaves follow ``integer_policy`` as in ``fjt.aggregate.mean``; results keep the
  inputs' shardings."""
  return aggregate_trees("slerp", [a, b], None, integer_policy, params={"t": float(t)})
