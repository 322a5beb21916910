"""Average runs and checkpoints on disk into one checkpoint (the engine of ``scripts/average.py``).

Params are aggregated by ``method``: a rule of the registry ``fjt.aggregate.RULES``
(``mean``, ``median``, ``trimmed_mean`` and any registered with ``fjt.aggregate.register``)
or ``"greedy"``, the greedy soup, which is a method of its own here because it needs an
evaluator (the test split of a config), not a per-leaf reduction. BatchNorm statistics are
merged exactly (``fjt.aggregate.merge_batch_stats``, the input weights as counts), whatever
the method (TIES, DARE and SLERP apply to params only). For ``method="mean"`` the inputs are
read one at a time, each in a few groups of leaves, into float32 running means, so peak
memory is about that of one model and a group of leaves, however many inputs; other rules
read the same groups of leaves from every input (and the base) in lockstep, so memory is
about N + 1 groups, not N models; the greedy soup loads every input.
With a config, every input and the result are evaluated on its test split.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from fjt import aggregate, checkpoint
from fjt.tasks import Task
from fjt.tree import flatten, unflatten

PyTree = Any
GREEDY = "greedy"  # The method that is not a rule of the registry.
PIECES = 4  # Groups of leaves each input is read in by the streaming mean.
MIN_PIECE_BYTES = 64 * 2**20


@dataclasses.dataclass
class MergeResult:
  """What ``average_checkpoints`` did.

  Attributes:
    variables: the merged ``{"params", "batch_stats"}`` (also saved to ``out``).
    rows: one dict per input (``path``, ``weight``, and eval metrics with a config)
      and a last one for the result (``path`` = ``out``).
    chosen: indices of the inputs that went into the result (greedy soups use a subset).
  """
  variables: dict[str, PyTree]
  rows: list[dict[str, Any]]
  chosen: list[int]


def methods(aliases: bool = False) -> list[str]:
  """The names ``average_checkpoints`` takes: the registered rules, ``"greedy"``, and with
  ``aliases`` the rules' other names (``"trimmed"``)."""
  names = aggregate.rule_names(aliases)
  return names[:len(aggregate.RULES)] + [GREEDY] + names[len(aggregate.RULES):]


def describe_methods() -> str:
  """One line per method, for ``--help``: the registry's rules and the greedy soup."""
  return aggregate.describe() + f"\n{GREEDY}: greedy soup selected on the config's test split"


def check_inputs(paths: Sequence[str]) -> None:
  """Compares the params and batch_stats of every checkpoint with the first's, from
  metadata only; the error names both checkpoints and every differing path."""
  first = checkpoint.variables_shapes(paths[0])
  for path in paths[1:]:
    report = checkpoint.compare(checkpoint.variables_shapes(path), first)
    if report.missing or report.unexpected or report.mismatched:
      raise ValueError(f"{path} does not have the variables of {paths[0]}:\n{report}")


def make_evaluator(config) -> tuple[Callable[[dict[str, PyTree]], dict[str, float]], Task]:
  """``(evaluate(variables) -> the task's metrics on the test split of config, task)``."""
  from fjt.checks import resolve_task
  from fjt.data import load_dataset
  from fjt.models import create_model
  from fjt.options import RunOptions
  from fjt.steps import evaluate, make_eval_step

  options = RunOptions.from_config(config)
  dataset = load_dataset(options.data)
  task = resolve_task(options.task, dataset)
  eval_step = make_eval_step(create_model(options.model), task)

  def evaluate_variables(variables):
    return evaluate(eval_step, variables, dataset.test, options.train.eval_batch_size)

  return evaluate_variables, task


def _recompute(config, variables):
  from fjt.data import load_dataset
  from fjt.models import create_model
  x = load_dataset(config.data).train["x"]
  size = config.train.batch_size
  return aggregate.recompute_batch_stats(create_model(config.model), variables,
                                         (x[i:i + size] for i in range(0, len(x), size)))


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
  try:
    return ctypes.CDLL(None).malloc_trim  # glibc
  except (AttributeError, OSError):
    return None


def _release_freed_memory() -> None:
  """Hands memory freed so far back to the OS, where the C library can (glibc's
  ``malloc_trim``). Without it the buffers of each checkpoint read, freed but kept by the
  allocator in several thread arenas, pile up into about two models more of resident memory."""
  trim = _malloc_trim()
  if trim is not None:
    trim(0)


def _leaf_groups(shapes: dict[str, jax.ShapeDtypeStruct], pieces: int) -> list[list[str]]:
  """The paths of ``shapes``, in order, cut into about ``pieces`` groups of similar size (none
  smaller than ``MIN_PIECE_BYTES`` unless it is the last)."""
  sizes = {p: math.prod(s.shape) * np.dtype(s.dtype).itemsize for p, s in shapes.items()}
  budget = max(sum(sizes.values()) / pieces, MIN_PIECE_BYTES)
  groups, filled = [[]], 0
  for path, size in sizes.items():
    if groups[-1] and filled + size > budget:
      groups.append([])
      filled = 0
    groups[-1].append(path)
    filled += size
  return groups


def _streaming_mean(paths, weights, on_input):
  """The weighted mean of the params and the merged BatchNorm statistics, reading the inputs
  one at a time, each in ``PIECES`` groups of leaves: one running mean per group, so memory is
  about one float32 model plus a group, however many and however large the inputs."""
  shapes = checkpoint.variables_shapes(paths[0])  # check_inputs: the same for every input.
  groups = _leaf_groups({p: s for p, s in shapes.items() if not p.startswith("batch_stats/")},
                        PIECES)
  stats_paths = [p for p in shapes if p.startswith("batch_stats/")]
  means = [aggregate.RunningMean() for _ in groups]
  stats, count = None, 0.0
  for i, (path, weight) in enumerate(zip(paths, weights)):
    pieces = checkpoint.iter_variables(path, groups + [stats_paths])
    for mean, piece in zip(means, pieces):  # Each piece is read when asked for.
      aggregate.check_finite([piece], [path])
      mean.add(unflatten(piece), weight)
      del piece
      _release_freed_memory()
    batch_stats = unflatten(next(pieces)).get("batch_stats")
    if batch_stats:  # Pairwise merging is exact: the pooled formula is associative.
      aggregate.check_finite([batch_stats], [path])
      stats = batch_stats if stats is None else aggregate.merge_batch_stats(
          [stats, batch_stats], [count, weight])
    count += weight
    del batch_stats
    on_input(i, lambda: checkpoint.load_variables(path))
  params = {}
  for mean in means:
    params.update(flatten(mean.result(consume=True)))
  return {"params": unflatten(params)["params"], "batch_stats": stats or {}}


def _streaming_rule(paths, weights, rule, params, base, on_input):
  """The rule on params read in lockstep, group of leaves by group, from every input and the
  base (memory: one group of each, not every model); BatchNorm statistics by the exact pooled
  rule. The rule sees the params subtree, so its leaf paths (``leaf_id``) are those of
  ``fjt.aggregate``'s in-memory forms on ``variables["params"]``."""
  shapes = checkpoint.variables_shapes(paths[0])
  groups = _leaf_groups({p: s for p, s in shapes.items() if not p.startswith("batch_stats/")},
                        PIECES)
  stats_paths = [p for p in shapes if p.startswith("batch_stats/")]
  readers = [checkpoint.iter_variables(p, groups + [stats_paths]) for p in paths]
  base_reader = checkpoint.iter_variables(base, groups) if base is not None else None
  merged = {}
  for _ in groups:
    pieces = [next(reader) for reader in readers]
    for piece, path in zip(pieces, paths):
      aggregate.check_finite([piece], [path])
    base_params = None
    if base_reader is not None:
      base_piece = next(base_reader)
      aggregate.check_finite([base_piece], [base])
      base_params = unflatten(base_piece).get("params", {})
    out = aggregate.aggregate_trees(rule, [unflatten(p).get("params", {}) for p in pieces],
                                    weights, params=params, base=base_params)
    merged.update(flatten({"params": out}))
    del pieces, base_params, out
    _release_freed_memory()
  stats = [unflatten(next(reader)).get("batch_stats", {}) for reader in readers]
  for i, path in enumerate(paths):
    aggregate.check_finite([stats[i]], [path])
    on_input(i, lambda: checkpoint.load_variables(path))
  return {"params": unflatten(merged).get("params", {}),
          "batch_stats": aggregate.merge_batch_stats(stats, weights) if stats[0] else {}}


def average_checkpoints(paths: Sequence[str], out: str, weights: Sequence[float] | None = None,
                        method: str = "mean", trim: float = 0.2, config=None,
                        recompute_batch_stats: bool = False, progress: bool = True,
                        params: Mapping[str, Any] | None = None,
                        base: str | None = None) -> MergeResult:
  """Aggregates the variables of checkpoints ``paths`` (run workdirs or checkpoint
  directories) and saves ``{"params", "batch_stats"}`` to the new directory ``out``.

  Every input's files are checked against its manifest as it is read, and an input with a
  NaN or Inf is an error naming its path and the leaf's.

  Args:
    weights: one non-negative weight per input (e.g. example counts); default equal.
    method: a rule of ``fjt.aggregate.RULES``: "mean" (weighted, streaming), "median",
      "trimmed_mean" (alias "trimmed"; ``trim`` fraction cut at each end) or one the user
      registered (all inputs in memory, the weights passed to the rule); or "greedy" (a
      greedy soup selected on the test split of ``config``; all inputs in memory).
    trim: the rule's parameter ``trim``, for rules that declare one.
    params: other parameters of the rule, over its defaults (``density``, ``t``, ``seed`` ...).
    base: the checkpoint the inputs were fine-tuned from, for the rules that merge task
      vectors (``ties``, ``dare``, ``dare_ties``: required). For another rule it is the first
      model, before ``paths`` (mergekit's ``base_model``: ``slerp``'s ``t = 0`` end); its
      weight is 1 unless ``weights`` has one more entry than ``paths``.
    config: an experiment config; evaluates every input and the result.
    recompute_batch_stats: re-estimate the result's BatchNorm statistics with
      forward passes over the training split of ``config`` (for inputs whose
      weights diverged, e.g. runs from different seeds).
  """
  rule = None if method == GREEDY else _rule(method)
  if rule is not None:
    params = rule.bind({**({"trim": trim} if "trim" in rule.params else {}), **(params or {})})
  if len(paths) < 1:
    raise ValueError("give at least one checkpoint to average")
  if rule is not None and rule.needs_base and base is None:
    raise ValueError(f"method {method!r} merges task vectors: give the base checkpoint the "
                     "inputs were fine-tuned from (--base)")
  if base is not None and (rule is None or not rule.needs_base):
    if weights is not None and len(weights) == len(paths):
      weights = [1.0] + list(weights)
    paths, base = [base] + list(paths), None
  weights = [1.0] * len(paths) if weights is None else [float(w) for w in weights]
  if len(weights) != len(paths):
    raise ValueError(f"got {len(weights)} weights for {len(paths)} inputs")
  if (method == GREEDY or recompute_batch_stats) and config is None:
    raise ValueError("a greedy soup and recomputed batch statistics need a config (its data)")
  if os.path.exists(out):
    raise ValueError(f"output {out!r} exists; choose a new directory")
  check_inputs(paths + ([base] if base is not None else []))

  evaluate, task = make_evaluator(config) if config is not None else (None, None)
  rows = [{"path": p, "weight": w} for p, w in zip(paths, weights)]
  bar = tqdm(total=len(paths), desc=f"average ({method})", unit="input", disable=not progress)

  def on_input(i, read_variables):
    if evaluate is not None:
      rows[i].update(evaluate(read_variables()))
    bar.update()

  try:  # The bar is closed before an error is printed.
    chosen = list(range(len(paths)))
    if rule is not None and rule.name == "mean":
      merged = _streaming_mean(paths, weights, on_input)
    elif rule is not None:
      merged = _streaming_rule(paths, weights, rule, params, base, on_input)
    else:
      inputs = []
      for i, path in enumerate(paths):
        inputs.append(checkpoint.load_variables(path))
        aggregate.check_finite([inputs[-1]], [path])
        on_input(i, lambda: inputs[-1])
      sign = 1.0 if task.mode == "max" else -1.0  # greedy_soup keeps higher scores.
      _, chosen, _ = aggregate.greedy_soup(inputs, lambda v: sign * evaluate(v)[task.headline])
      inputs, weights = [inputs[i] for i in chosen], [weights[i] for i in chosen]
      merged_params = aggregate.mean([v["params"] for v in inputs], weights)
      stats = [v["batch_stats"] for v in inputs]
      merged = {"params": merged_params,
                "batch_stats": aggregate.merge_batch_stats(stats, weights) if stats[0] else {}}
  finally:
    bar.close()
  if recompute_batch_stats and merged["batch_stats"]:
    merged = _recompute(config, merged)

  checkpoint.save(out, merged)
  result = {"path": out, "weight": float(sum(weights))}
  if evaluate is not None:
    result.update(evaluate(merged))
  return MergeResult(jax.device_get(merged), rows + [result], chosen)


def _rule(method: str) -> aggregate.Rule:
  try:
    return aggregate.get_rule(method)
  except ValueError:
    raise ValueError(f"method must be one of {methods()}, got {method!r}") from None


def format_rows(result: MergeResult) -> str:
  """The inputs and the result as an aligned table."""
  keys = [k for k in ("loss", "accuracy") if k in result.rows[-1]]
  header = ["input", "weight", *keys, "used"]
  body = []
  for i, row in enumerate(result.rows):
    used = "result" if i == len(result.rows) - 1 else ("yes" if i in result.chosen else "no")
    body.append([row["path"], f"{row['weight']:g}", *(f"{row[k]:.4f}" for k in keys), used])
  widths = [max(len(r[c]) for r in [header, *body]) for c in range(len(header))]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *body])
