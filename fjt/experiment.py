"""A config to runs: its options read once, a pretraining run composed before it, and the right
loop: one model (``fjt.train.fit``) or N replicas in rounds (``fjt.replicas.program``). This is the
one module that imports the loops; below it, code takes ``fjt.options`` objects."""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from fjt import replicas, train
from fjt.checks import resolve_task
from fjt.config import copy_config
from fjt.data import Dataset, baseline_lines, data_baselines, load_dataset
from fjt.logs import write_summary
from fjt.options import ReplicaOptions, RunOptions
from fjt.state import TrainState
from fjt.steps import TaskLike

PRETRAIN = "pretrain"  # The subfolder of a run's workdir that its pretraining run writes.


def fit(config: ml_collections.ConfigDict | RunOptions, workdir: str,
        model: nn.Module | None = None, dataset: Dataset | None = None,
        task: TaskLike | None = None, progress: bool = True,
        desc: str | None = None) -> tuple[TrainState, dict[str, Any]]:
  """Trains ``config`` (or its ``RunOptions``); returns (final state, summary).

  A config with a ``replicas`` group trains N replicas in rounds (``fjt.replicas.program``,
  run by ``fjt.train.run``, the loop every run goes through) and then its baselines; any
  other is one model, data parallel over the devices (``fjt.train.fit``). A ``pretrain``
  config is trained first into ``WORKDIR/pretrain`` (resumable like any run), and the run
  starts from it unless ``init_from`` names another checkpoint. ``model``, ``dataset`` and
  ``task`` replace what the config names.
  """
  options = config if isinstance(config, RunOptions) else RunOptions.from_config(config)
  if options.init.pretrain is not None:
    pretrain_dir = os.path.join(workdir, PRETRAIN)
    train.fit(options.init.pretrain, pretrain_dir, progress=progress, desc=PRETRAIN)
    if not options.init.init_from:
      options = dataclasses.replace(
          options, init=dataclasses.replace(options.init, init_from=pretrain_dir))
  if options.replicas is not None:
    return _fit_replicas(options, workdir, model, dataset, task, progress)
  return train.fit(options, workdir, model=model, dataset=dataset, task=task, progress=progress,
                   desc=desc)


def baseline_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """A baseline of a replicas config, for ``fjt.train.fit``: the same model, optimizer and seed
  for as many optimizer steps as each replica takes (``warmup_steps + rounds * local_steps``),
  evaluated every ``local_steps`` steps and checkpointed at the end only. ``"centralized"`` or
  ``"sync"``: synchronous data parallel on the whole training set with the global batch
  ``N * B`` (the same examples seen); ``"single"``: one worker with the per-replica batch B."""
  opts = ReplicaOptions.from_config(config)
  steps = opts.inner_steps
  baseline = copy_config(config)
  del baseline["replicas"]
  baseline.train.steps = steps
  baseline.train.batch_size = config.train.batch_size * (1 if name == "single" else opts.num)
  baseline.train.eval_every = baseline.train.log_every = opts.local_steps
  baseline.checkpoint.every_steps = steps
  return baseline


def _fit_replicas(options: RunOptions, workdir: str, model: nn.Module | None,
                  dataset: Dataset | None, task: TaskLike | None,
                  progress: bool) -> tuple[TrainState, dict[str, Any]]:
  """The replica run, then each of ``replicas.baselines`` as its own run in ``WORKDIR/<name>``;
  their eval metrics join the summary as ``<name>_<metric>`` and their curves the plot."""
  dataset = dataset if dataset is not None else load_dataset(options.data)
  task = resolve_task(options.task, dataset, task)
  options = replicas.with_steps(options, options.replicas.inner_steps)
  tic = time.perf_counter()
  final, summary = train.run(
      options, workdir, functools.partial(replicas.program, options, workdir, model, dataset, task),
      progress)
  summary["seconds"] = {"replicas": time.perf_counter() - tic}
  references = data_baselines(dataset)
  curves = {}
  for name in options.replicas.baselines:
    baseline, directory = baseline_config(options.config, name), os.path.join(workdir, name)
    tic = time.perf_counter()
    _, result = train.fit(baseline, directory, model=model, dataset=dataset, task=task,
                          progress=False)  # One summary line, not a line per eval.
    summary["seconds"][name] = time.perf_counter() - tic
    summary["eval"].update({f"{name}_{k}": v for k, v in result["eval"].items()
                            if k not in references})  # The data's own baselines once.
    curves[name] = os.path.join(directory, "metrics.jsonl")
    if progress and jax.process_index() == 0:
      print(f"{name} baseline ({baseline.train.steps} steps): " +
            ", ".join(f"{k} {v:.4f}" for k, v in result["eval"].items()), flush=True)
  if curves and jax.process_index() == 0:
    write_summary(workdir, summary, task.headline, baseline_lines(dataset), curves)
  return final, summary


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       model: nn.Module | None = None, dataset: Dataset | None = None,
                       task: TaskLike | None = None, progress: bool = True) -> dict[str, Any]:
  """Trains ``config`` and returns its summary: ``{"step": ..., "eval": {...}}`` (``fit``)."""
  return fit(config, workdir, model=model, dataset=dataset, task=task, progress=progress)[1]
