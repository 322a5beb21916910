"""Weight aggregation as tree arithmetic: means, BatchNorm statistics, robust aggregates, soups.

The seed algorithm is the element-wise mean ``W_agg[i] = (1/N) * sum_j W_j[i]`` over N pytrees of
the same structure, shapes and dtypes (whole train states, ``params``, ``batch_stats`` ...)::

  averaged = fjt.aggregate.mean([state_a, state_b, state_c])
  fedavg = fjt.aggregate.aggregate_variables(client_variables, counts=num_examples)

Floating leaves are accumulated in at least float32 (bf16/fp16 upcast, float64 kept) and cast back
to their dtype. Integer and bool leaves (step counters, PRNG keys) are never float-averaged: equal
values pass through and differing ones follow ``integer_policy``: ``"max"`` (right for step
counters), ``"first"`` (input 0) or ``"error"``. Every input is checked against input 0 first, and
errors name the input and the '/'-joined path of the leaf, e.g. ``params/Dense_0/kernel``.

Named rules (``mean``, ``median``, ``trimmed_mean``, the LLM merges ``ties``, ``dare``,
``dare_ties`` and ``slerp``, and the user's, ``register``) serve lists of
trees (``aggregate_trees``), stacked replica axes (``aggregate_stacked``, replica rounds),
``fjt.merge`` and ``scripts/average.py``; see ``fjt.aggregate.registry``.

One module per concept: ``checks`` (structure, shapes, dtypes, policies, weights), ``finite``
(NaN/Inf), ``leaves`` (traced per-leaf pieces), ``mean``, ``batch_norm``, ``robust``, ``soups``,
``task_arithmetic``, ``ties``, ``dare``, ``slerp``, ``stacked`` (a leading replica axis), ``registry``.
"""

# _weights_array and _mean_leaves stay reachable here for the tests that inspect the kernel's
# compilations (cache size, collectives in its HLO).
from fjt.aggregate.checks import (INTEGER_POLICIES, NONFINITE_POLICIES, _weights_array,
                                  check_compatible)
from fjt.aggregate.finite import check_finite
from fjt.aggregate.leaves import per_row, weighted_sum
from fjt.aggregate.mean import RunningMean, _mean_leaves, mean, weighted_mean
from fjt.aggregate.batch_norm import (aggregate_variables, merge_batch_stats, pooled_moments,
                                      recompute_batch_stats)
from fjt.aggregate.robust import mean_of_middle, median, trim_count, trimmed_mean
from fjt.aggregate.soups import greedy_soup, uniform_soup
from fjt.aggregate.task_arithmetic import task_arithmetic
from fjt.aggregate.ties import kth_largest, sign_elected_mean, ties, top_magnitude
from fjt.aggregate.dare import dare, dare_mask
from fjt.aggregate.slerp import slerp
from fjt.aggregate.stacked import aggregate_stacked, replica_batch_stats, replica_mean
from fjt.aggregate.registry import (RULES, Rule, aggregate_trees, describe, get_rule, leaf_id,
                                    register, rule_names)
from fjt.tree import tree_paths

__all__ = [
    "INTEGER_POLICIES", "NONFINITE_POLICIES", "RULES", "Rule", "RunningMean", "aggregate_stacked",
    "aggregate_trees", "aggregate_variables", "check_compatible", "check_finite", "dare",
    "dare_mask", "describe", "get_rule", "greedy_soup", "kth_largest", "leaf_id", "mean",
    "mean_of_middle", "median", "merge_batch_stats", "per_row", "pooled_moments",
    "recompute_batch_stats", "register", "replica_batch_stats", "replica_mean", "rule_names",
    "sign_elected_mean", "slerp", "task_arithmetic", "ties", "top_magnitude", "tree_paths",
    "trim_count", "trimmed_mean", "uniform_soup", "weighted_mean", "weighted_sum",
]
