"""BatchNorm statistics of N models merged exactly, and re-estimated with forward passes.

Per module, the statistics of the union of the models' data (the law of total variance)::

  mean = sum_j n_j * mean_j / n,   var = sum_j n_j * (var_j + (mean_j - mean)^2) / n

computed by ``pooled_moments``, the one formula of ``merge_batch_stats`` (lists of trees),
``recompute_batch_stats`` (batches) and ``fjt.aggregate.replica_batch_stats`` (a replica axis).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fjt.aggregate.checks import (_acc_dtype, _as_list, _at, _check_weights, _Flat, _flatten_all,
                                  _input_names, _is_floating, _weights_array)
from fjt.aggregate.finite import _kept_inputs, _nonfinite_inputs, _prepare
from fjt.aggregate.leaves import _divide, weighted_sum
from fjt.aggregate.mean import _mean
from fjt.state import PyTree, model_kwargs
from fjt.tree import path_str


def pooled_moments(means: jax.Array, variances: jax.Array, counts: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
  """The mean and variance (ddof=0) of the union of N groups of ``counts`` ``(N,)`` values with
  means ``means`` and variances ``variances`` ``(N, features)``, all in the accumulation dtype:
  the weighted means of ``means`` and of ``variances + (means - mean)^2``. Traceable."""
  total = jnp.sum(counts)
  # Correctly rounded divisions (not XLA's x * (1/total)): the same bits on every layout.
  mean = _divide(weighted_sum(means, counts), total)
  return mean, _divide(weighted_sum(variances + jnp.square(means - mean), counts), total)


def _batch_norm_pairs(paths: Sequence[str], dtypes: Sequence[np.dtype], prefix: str = ""
                      ) -> dict[str, tuple[int, int]]:
  """{module path: (leaf index of mean, leaf index of var)}; raises naming a malformed module."""
  join = lambda p: f"{prefix}/{p}" if prefix and p else (prefix or p)
  modules: dict[str, dict[str, int]] = {}
  for k, path in enumerate(paths):
    parent, _, name = path.rpartition("/")
    if name not in ("mean", "var"):
      raise ValueError(f"{_at(join(path))} is not a BatchNorm statistic: batch_stats leaves are "
                       "named 'mean' and 'var', one pair per BatchNorm module")
    if not _is_floating(dtypes[k]):
      raise TypeError(f"{_at(join(path))} has dtype {dtypes[k]}; BatchNorm statistics are floating")
    modules.setdefault(parent, {})[name] = k
  for parent, pair in modules.items():
    if len(pair) != 2:
      (has,) = pair
      lacks = "var" if has == "mean" else "mean"
      raise ValueError(f"BatchNorm module {_at(join(parent))} has '{has}' but no '{lacks}'")
  return {parent: (pair["mean"], pair["var"]) for parent, pair in modules.items()}


@functools.partial(jax.jit, static_argnames=("pairs",))
def _pooled_stats(leaves: list[list[jax.Array]], counts: jax.Array,
                  pairs: tuple[tuple[int, int], ...]) -> list[jax.Array]:
  out = list(leaves[0])
  for mean_k, var_k in pairs:
    acc_dtype = _acc_dtype(leaves[0][mean_k].dtype)
    stacked = lambda k: jnp.stack([leaf[k].astype(acc_dtype) for leaf in leaves])
    mean, var = pooled_moments(stacked(mean_k), stacked(var_k), counts.astype(acc_dtype))
    out[mean_k] = mean.astype(leaves[0][mean_k].dtype)
    out[var_k] = var.astype(leaves[0][var_k].dtype)
  return out


def merge_batch_stats(stats: Sequence[PyTree], counts: Sequence[float]) -> PyTree:
  """BatchNorm statistics of N replicas merged into those of the union of their data.

  Each ``stats[j]`` is a ``batch_stats`` collection: under each BatchNorm module a dict with
  ``mean`` and ``var`` (float32 ``(features,)``), the mean and population (ddof=0) variance of
  ``counts[j]`` examples, as flax's BatchNorm keeps them. Per module, with ``n = sum_j n_j``::

    mean = sum_j n_j * mean_j / n,   var = sum_j n_j * (var_j + (mean_j - mean)^2) / n

  i.e. the law of total variance; a plain mean of the variances would miss the between-replica
  term. ``counts`` are non-negative with a positive sum (only their ratios matter).
  """
  stats = _as_list(stats, "stats")
  names = _input_names(len(stats))
  flats = _flatten_all(stats, names)
  counts = _check_weights(counts, len(stats), "counts")
  pairs = _batch_norm_pairs(flats[0].paths, [dtype for _, dtype in flats[0].specs])
  out = _pooled_stats([f.leaves for f in flats], _weights_array(counts),
                      pairs=tuple(pairs.values()))
  return flats[0].treedef.unflatten(out)


_MOMENTS = "fjt_batch_norm_moments"


def _record_batch_norm_moments(next_fun, args, kwargs, context):
  """Method interceptor: sows the mean, population variance and count of each training-mode
  BatchNorm's input, reduced over every axis but the feature axes, as the module would."""
  module = context.module
  if isinstance(module, nn.BatchNorm) and context.method_name == "__call__":
    x = args[0]
    use_running_average = nn.merge_param(
        "use_running_average", module.use_running_average,
        kwargs.get("use_running_average", args[1] if len(args) > 1 else None))
    if not use_running_average:
      if kwargs.get("mask") is not None:
        raise ValueError(f"BatchNorm {'/'.join(module.path)} is called with a mask; "
                         "recompute_batch_stats does not support masked statistics")
      feature_axes = {a % x.ndim for a in np.atleast_1d(module.axis)}
      axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
      x = x.astype(_acc_dtype(x.dtype))
      mu = jnp.mean(x, axes)
      # Two passes (not E[x^2] - E[x]^2): exact statistics are the point here.
      var = jnp.mean(jnp.square(x - jnp.expand_dims(mu, axes)), axes)
      count = int(np.prod([x.shape[a] for a in axes]))
      module.sow(_MOMENTS, "moments", (mu, var, jnp.asarray(count, jnp.int32)))
  return next_fun(*args, **kwargs)


@functools.partial(jax.jit, static_argnums=0)
def _batch_moments(model: nn.Module, variables: PyTree, x: jax.Array) -> PyTree:
  with nn.intercept_methods(_record_batch_norm_moments):
    _, updates = model.apply(variables, x, **model_kwargs(model, train=True),
                             mutable=["batch_stats", _MOMENTS],
                             rngs={"dropout": jax.random.PRNGKey(0)})
  return updates.get(_MOMENTS, {})


def recompute_batch_stats(model: nn.Module, variables: Mapping[str, PyTree],
                          batches: Iterable[jax.Array | Mapping[str, jax.Array]]
                          ) -> dict[str, PyTree]:
  """``variables`` with every BatchNorm's statistics re-estimated over all of ``batches``.

  Needed after averaging diverged weights: the averaged running statistics do not describe the
  averaged network's activations. Each batch (an input array ``x``, or a dict holding ``"x"``)
  goes through ``model.apply(variables, x, train=True)``; a method interceptor records each
  BatchNorm's input mean and population variance over the reduced axes (batch, and height and
  width for convolutions), and the per-batch moments are pooled with the exact formula of
  ``merge_batch_stats``, weighted by the number of values reduced. So the result is the mean and
  variance (ddof=0) of the BatchNorm inputs over the concatenated data, independent of momentum
  (the training-time running average is an EMA). As in PyTorch's ``update_bn``, later layers see
  activations normalized with per-batch statistics (train mode); with all data in one batch every
  layer's statistics are those of the whole data. BatchNorms used in eval mode keep theirs.
  """
  if "batch_stats" not in variables:
    raise ValueError(f"variables has collections {sorted(variables)}; recompute_batch_stats "
                     "needs 'batch_stats'")
  flat = _Flat(variables["batch_stats"])
  pairs = _batch_norm_pairs(flat.paths, [dtype for _, dtype in flat.specs], "batch_stats")
  pooled: dict[str, tuple[dict[str, jax.Array], int]] = {}
  seen_batches = 0
  for batch in batches:
    x = batch["x"] if isinstance(batch, Mapping) else batch
    moments = _batch_moments(model, variables, x)
    seen_batches += 1
    for keypath, sown in jax.tree_util.tree_flatten_with_path(
        moments, is_leaf=lambda node: isinstance(node, tuple))[0]:
      module = path_str(keypath[:-1])  # Drop the sow name: the rest is the module's path.
      for mu, var, count in sown:
        stats, n = {"mean": mu, "var": var}, int(count)
        if module in pooled:
          previous, n_before = pooled[module]
          stats, n = merge_batch_stats([previous, stats], [n_before, n]), n_before + n
        pooled[module] = stats, n
  if not seen_batches:
    raise ValueError("batches is empty; recompute_batch_stats needs at least one batch")
  leaves = list(flat.leaves)
  for module, (mean_k, var_k) in pairs.items():
    if module in pooled:
      leaves[mean_k] = pooled[module][0]["mean"].astype(flat.specs[mean_k][1])
      leaves[var_k] = pooled[module][0]["var"].astype(flat.specs[var_k][1])
  return {**variables, "batch_stats": flat.treedef.unflatten(leaves)}


def aggregate_variables(variables_list: Sequence[Mapping[str, PyTree]], counts: Sequence[float],
                        integer_policy: str = "max", on_nonfinite: str = "error"
                        ) -> dict[str, PyTree]:
  """FedAvg of N models' variables: ``params`` by the mean weighted by ``counts``, ``batch_stats``
  by ``merge_batch_stats`` (exact pooled statistics of the union of the replicas' data).

  ``variables_list[j]`` is ``{"params": ..., "batch_stats": ...}`` as ``model.init`` returns it
  (``batch_stats`` optional); ``counts[j]`` is the number of examples replica j trained on.
  """
  variables_list = _as_list(variables_list, "variables_list")
  _, names = _prepare(variables_list, integer_policy, on_nonfinite)
  collections = list(variables_list[0].keys()) if isinstance(variables_list[0], Mapping) else None
  if collections is None or not set(collections) <= {"params", "batch_stats"} or \
      "params" not in collections:
    raise ValueError(f"input 0 has collections {collections}; aggregate_variables takes "
                     "{'params', 'batch_stats'} (use mean() for other trees)")
  counts = _check_weights(counts, len(variables_list), "counts")
  stats = [{"batch_stats": v.get("batch_stats", {})} for v in variables_list]
  stats_flats = [_Flat(s) for s in stats]
  # Validated here, with paths from the variables' root, before any arithmetic.
  _batch_norm_pairs(stats_flats[0].paths, [d for _, d in stats_flats[0].specs])
  kept = _kept_inputs(_nonfinite_inputs(stats_flats), names, on_nonfinite)
  params, used = _mean([_Flat({"params": variables_list[i]["params"]}) for i in kept],
                       [names[i] for i in kept], counts[kept], integer_policy, on_nonfinite)
  used = [kept[i] for i in used]
  result = {"params": params["params"]}
  if "batch_stats" in collections:
    batch_stats = [variables_list[i]["batch_stats"] for i in used]
    result["batch_stats"] = (merge_batch_stats(batch_stats, counts[used])
                             if jax.tree.leaves(batch_stats[0]) else batch_stats[0])
  return result

