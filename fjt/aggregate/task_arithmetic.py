"""Task arithmetic (Ilharco et al., 2023): ``base + scale * sum_j (W_j - base)`` per leaf."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fjt.aggregate.checks import _acc_dtype, _as_list, _flatten_all, _is_floating
from fjt.aggregate.finite import _check_result, _kept_inputs
from fjt.aggregate.leaves import _finite_sum, _stack
from fjt.state import PyTree


@jax.jit
def _task_arithmetic_leaves(base: list[jax.Array], leaves: list[list[jax.Array]], scale: jax.Array
                            ) -> tuple[list[jax.Array], jax.Array]:
  """base + scale * sum_j (W_j - base) per floating leaf; integer leaves are base's."""
  outs, oks = [], []
  for b, column in zip(base, zip(*leaves)):
    if _is_floating(b.dtype):
      acc_dtype = _acc_dtype(b.dtype)
      b_acc = b.astype(acc_dtype)
      delta = functools.reduce(jnp.add, [x.astype(acc_dtype) - b_acc for x in column])
      out = (b_acc + scale.astype(acc_dtype) * delta).astype(b.dtype)
      outs.append(out)
      oks.append(_finite_sum(out))
    else:
      outs.append(jnp.copy(b))
      oks.append(jnp.asarray(True))
  return outs, _stack(oks)


def task_arithmetic(base: PyTree, trees: Sequence[PyTree], scale: float = 1.0) -> PyTree:
  """Adds scaled task vectors to a base model: ``base + scale * sum_j (W_j - base)`` per leaf.

  Floating leaves are computed in float32 (float64 for float64) and cast to the base's dtype;
  integer leaves are the base's. A NaN/Inf in any input raises, naming it (``base`` or
  ``tree j``) and the path.
  """
  trees = _as_list(trees)
  names = ["base"] + [f"tree {j}" for j in range(len(trees))]
  flats = _flatten_all([base] + trees, names)
  scale = float(scale)
  if not np.isfinite(scale):
    raise ValueError(f"scale is {scale}; it must be finite")
  out, ok = _task_arithmetic_leaves(flats[0].leaves, [f.leaves for f in flats[1:]],
                                    jnp.asarray(scale, jax.dtypes.canonicalize_dtype(jnp.float64)))
  _kept_inputs(_check_result(ok, out, flats, names, "task arithmetic"), names, "error",
               skippable=False)
  return flats[0].treedef.unflatten(out)

