"""What the one training loop (``fjt.train.run``) runs: a state and its step.

A single model (``fjt.train.single_model``) and N replicas in rounds (``fjt.replicas.program``)
are both a ``Program``: the loop checkpoints, resumes, reshards, logs, evaluates and stops on
signals the same way for each, as MaxText runs DiLoCo's state and step with its one loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

PyTree = Any
Metrics = Mapping[str, jax.Array]


@dataclasses.dataclass
class Program:
  """A state and its step, as the loop runs them.

  Attributes:
    state: the fresh state, laid out on the devices; also the restore target of a resume
      (its shardings are where a checkpoint saved on another mesh lands).
    ends: the run's step count after each iteration, increasing (a single model:
      ``range(1, steps + 1)``; replicas: each warm-start step, then ``local_steps`` per round).
      Checkpoints and ``metrics.jsonl`` rows are named by these counts.
    step: ``(state, i) -> (state, metrics)``: iteration ``i`` (its batch is a function of ``i``),
      metrics on the devices.
    evaluate: ``state -> {metric: float}`` on the validation split.
    log_at: ``(i, done) -> bool``: write a train row after iteration ``i``.
    eval_at: ``(i, done) -> bool``: evaluate after iteration ``i`` (the last one always is).
    row: host metrics of the iterations since the last row -> that row (means; replica runs
      add each replica's loss).
    check: ``(window, first_done)`` raises ``fjt.checks.NonFiniteLossError`` naming the step
      of the first non-finite loss in ``window`` (the iterations after ``first_done``).
    start: the state a new run starts from (e.g. ``init_from``'s weights), given ``state``.
    finish: ``(state, eval metrics) -> (result state, summary)``, after the last iteration.
    task: the task's name; metric_names: what ``evaluate`` reports, for
      ``checkpoint.best_metric``.
    headline: the task's headline metric (``metrics.png``), better when ``mode`` ("max" or
      "min"): the default of ``checkpoint.best_mode``.
    baselines: horizontal lines of ``metrics.png`` (``fjt.data.baseline_lines``).
    lockstep: block on each step's metrics (collectives across processes; ``fjt.sharding``).
    desc: the progress bar's label.
  """
  state: PyTree
  ends: Sequence[int]
  step: Callable[[PyTree, int], tuple[PyTree, Metrics]]
  evaluate: Callable[[PyTree], dict[str, float]]
  log_at: Callable[[int, int], bool]
  eval_at: Callable[[int, int], bool]
  row: Callable[[list[Mapping[str, np.ndarray]]], dict[str, float]]
  check: Callable[[list[Mapping[str, np.ndarray]], int], None]
  start: Callable[[PyTree], PyTree]
  finish: Callable[[PyTree, dict[str, float]], tuple[PyTree, dict[str, Any]]]
  task: str
  metric_names: Sequence[str]
  headline: str
  mode: str
  baselines: Mapping[str, float]
  lockstep: bool = False
  desc: str = "train"

  @property
  def total(self) -> int:
    """The step count of the finished run."""
    return self.ends[-1]

  def iteration_after(self, done: int) -> int:
    """The iteration that follows the one that ended at step count ``done`` (0 for none)."""
    return 0 if done == 0 else self.ends.index(done) + 1


def mean_row(window: list[Mapping[str, np.ndarray]]) -> dict[str, float]:
  """Each metric's mean over the window (over every element of array metrics)."""
  return {k: float(np.mean([m[k] for m in window])) for k in window[0]}
