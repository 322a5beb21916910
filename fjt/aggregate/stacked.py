"""Rules over a leading replica axis of one stacked tree, traceable (used inside jitted rounds).

A tree whose every leaf is ``(N, ...)`` (N replicas of one model, ``fjt.replicas``) is
aggregated by the same registered rules as lists of trees (``fjt.aggregate.register``) and the
same BatchNorm formula (``pooled_moments``); over a replica axis sharded across devices the
reductions are cross-device collectives that XLA inserts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from fjt.aggregate.batch_norm import pooled_moments
from fjt.aggregate.checks import _acc_dtype, _is_floating
from fjt.aggregate.registry import Rule, get_rule, leaf_id
from fjt.state import PyTree
from fjt.tree import path_str

STACKED_INTEGER_POLICIES = ("max", "first")  # "error" needs a host check, not a traced one.


def aggregate_stacked(name: str | Rule, tree: PyTree, weights: jax.Array,
                      params: Mapping[str, Any] | None = None, integer_policy: str = "max",
                      base: PyTree | None = None) -> PyTree:
  """The rule ``name`` over the leading axis of every leaf of ``tree``.

  ``tree``'s leaves are ``(N, ...)``; ``weights`` is ``(N,)`` (e.g. example counts); ``params``
  go over the rule's defaults. Floating leaves are reduced in at least float32 and cast back;
  integer and bool leaves (step counters) take the maximum over N (``"max"``) or row 0's
  (``"first"``). The result has no leading axis. Traceable. ``base`` (leaves without the
  leading axis) is the base model of a rule that merges task vectors (``ties``, ``dare``).
  """
  rule = get_rule(name)
  params = rule.bind(params)
  if rule.needs_base and base is None:
    raise ValueError(f"aggregation rule {rule.name!r} merges task vectors: pass base=")
  if integer_policy not in STACKED_INTEGER_POLICIES:
    raise ValueError(f"integer_policy is {integer_policy!r}; over a stacked axis expected one of "
                     f"{STACKED_INTEGER_POLICIES}")

  def leaf(path, x: jax.Array, b: jax.Array | None) -> jax.Array:
    if _is_floating(x.dtype):
      return rule.leaf(x, weights, params, b, leaf_id(path_str(path)))
    return jnp.max(x, axis=0) if integer_policy == "max" else x[0]

  if base is None:
    return jax.tree_util.tree_map_with_path(lambda p, x: leaf(p, x, None), tree)
  return jax.tree_util.tree_map_with_path(leaf, tree, base)


def replica_mean(tree: PyTree, counts: jax.Array) -> PyTree:
  """Weighted mean over the leading replica axis: ``sum_k n_k x_k / sum_k n_k`` per leaf.

  ``tree``'s leaves are ``(N, ...)``; ``counts`` is ``(N,)`` (e.g. example counts). Floating
  leaves are accumulated in at least float32 and cast back; integer leaves (step counters) take
  the maximum over replicas. The result has no replica axis. Traceable: the rule ``"mean"``.
  """
  return aggregate_stacked("mean", tree, counts)


def replica_batch_stats(stats: PyTree, counts: jax.Array, path: str = "batch_stats") -> PyTree:
  """BatchNorm statistics of N replicas ``(N, features)`` merged into those of the union of their
  data: per module, with ``n = sum_k n_k``::

    mean = sum_k n_k * mean_k / n,   var = sum_k n_k * (var_k + (mean_k - mean)^2) / n

  ``pooled_moments``, the formula of ``merge_batch_stats``, on a stacked axis; traceable. Every
  leaf must be the ``mean`` or ``var`` of a module; the error names ``path`` otherwise.
  """
  if isinstance(stats, Mapping) and set(stats) == {"mean", "var"} and \
      not isinstance(stats["mean"], Mapping):
    acc = _acc_dtype(stats["mean"].dtype)
    mean, var = pooled_moments(stats["mean"].astype(acc), stats["var"].astype(acc),
                               counts.astype(acc))
    return type(stats)({"mean": mean.astype(stats["mean"].dtype),
                        "var": var.astype(stats["var"].dtype)})
  if isinstance(stats, Mapping):
    return type(stats)({k: replica_batch_stats(v, counts, f"{path}/{k}") for k, v in stats.items()})
  raise ValueError(f"{path} is not a BatchNorm statistic: batch_stats leaves are 'mean' and "
                   "'var', one pair per BatchNorm module")
