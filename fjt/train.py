"""The single-model loop: data parallel over the mesh, checkpointed, resumable."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from fjt import accelerators, checkpoint, distributed, runs, sharding
from fjt import data as fjt_data
from fjt.averaging import TemporalAveraging
from fjt.checkpoint import CheckpointError, LoadReport
from fjt.checks import (NonFiniteLossError, check_batch_size, check_finite, check_finite_eval,
                        check_finite_state, check_layout, check_model_fits_data, metric_names,
                        prepare_workdir, resolve_task)
from fjt.config import ConfigError
from fjt.data import Dataset, baseline_lines, data_baselines
from fjt.data.fingerprint import data_fingerprint
from fjt.files import write_atomic
from fjt.interop import hf
from fjt.logs import LogWriteError, RunLog, say
from fjt.models import create_model
from fjt.options import RunOptions
from fjt.preemption import StopSignals, StoppedBySignal
from fjt.program import Program, mean_row
from fjt.state import TrainState, create_state
from fjt.steps import TaskLike, evaluate, make_eval_step, make_train_step
from fjt.tree import flatten


def _say_resuming(start: int, steps: int, directory: str, changes: list[runs.Change]) -> None:
  """One line saying where a run resumes, and what a larger ``train.steps`` means."""
  raised = next((c for c in changes if c.key == "train.steps"), None)
  if start >= steps:
    say(f"the run finished at step {start} (checkpoint {directory}); evaluating it again "
        "(raise --config.train.steps to train on)")
    return
  say(f"resuming from step {start} (checkpoint {directory})")
  if raised is not None:
    say(f"train.steps raised from {raised.old} to {raised.new}: the run continues from step "
        f"{start}, the learning-rate schedule now that of {raised.new} steps")


def init_from_checkpoint(state: TrainState, path: str, skip=()) -> tuple[TrainState, LoadReport]:
  """Loads ``params`` and ``batch_stats`` of a checkpoint (a run's whole state,
  or a variables / params tree saved by ``fjt.checkpoint.save``, or a Hugging Face folder
  ``fjt.interop.hf.from_pretrained`` reads) into ``state``.

  Paths matching ``skip`` and paths missing from the checkpoint keep ``state``'s
  values; a shape difference outside ``skip`` is an error. Returns the state
  (step, optimizer state and rng untouched) and the load report. A LoRA state (``fjt.lora``)
  loads the checkpoint's params into its frozen ``base``.
  """
  if hf.is_pretrained(path):  # A Hugging Face folder: its variables, read in memory.
    source = hf.from_pretrained(path)[1]
    saved = flatten(source)
    load = functools.partial(checkpoint.load_tree, source, name=path)
  else:
    saved = checkpoint.saved_shapes(path)
    load = functools.partial(checkpoint.load, path)
  trained = "base" if state.base else "params"
  target = {"params": getattr(state, trained), "batch_stats": state.batch_stats}
  if any(p.startswith("params/") for p in saved):
    variables, report = load(target, strict=False, skip=skip)
  else:  # A params tree on its own, like torch.save(model.state_dict()).
    params, report = load(target["params"], strict=False,
                          skip=[re.sub(r"^\^?params/", "", s) for s in skip])
    variables = {"params": params, "batch_stats": state.batch_stats}
    prefixed = lambda paths: [f"params/{p}" for p in paths]
    stats = [f"batch_stats/{p}" for p in flatten(state.batch_stats)]  # Not in the file: missing.
    report = dataclasses.replace(
        report, missing=prefixed(report.missing) + stats, skipped=prefixed(report.skipped),
        mismatched=prefixed(report.mismatched), loaded=prefixed(report.loaded),
        details={f"params/{p}": d for p, d in report.details.items()})
  return state.replace(**{trained: variables["params"]},
                       batch_stats=variables["batch_stats"]), report


def _fine_tune_start(options: RunOptions, workdir: str, state: TrainState, tx,
                     averaging: TemporalAveraging) -> TrainState:
  """The state a new run starts from: fresh, or ``init_from`` (``fjt.experiment`` trains a
  ``pretrain`` config first and points ``init_from`` at it). The load report goes to
  ``WORKDIR/init_from.json``."""
  init_from = options.init.init_from
  if not init_from:
    return state
  try:
    state, report = init_from_checkpoint(state, init_from, options.init.init_skip)
  except checkpoint.CheckpointMismatchError as e:  # Bad input: exit 2, before any step.
    raise ConfigError(f"config key 'init_from': {e}") from e
  say(f"init_from {init_from}: {report.counts()}")
  state = state.replace(averages=averaging.init(state.variables))
  write_atomic(os.path.join(workdir, "init_from.json"),
               json.dumps({"path": init_from, "loaded": len(report.loaded), "skipped": report.skipped, "missing": report.missing,
                           "mismatched": report.mismatched}, indent=2))
  return state.replace(opt_state=tx.init(state.params))


def _read_json(path: str) -> dict[str, Any] | None:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _create_mesh(options: RunOptions) -> Mesh:
  train = options.train
  return sharding.create_train_mesh(
      options.sharding.mesh,
      {"train.batch_size": train.batch_size // train.grad_accum_steps,
       "train.eval_batch_size": train.eval_batch_size})


def _count_first_step(bar: tqdm, steps: int = 1) -> None:
  """Counts the first iteration of a process (which compiled: ``steps`` steps) and starts the
  bar's clock after it, so rate and ETA (``smoothing=0``: steps / seconds since then) leave the
  compile time out."""
  bar.n += steps
  if not bar.disable:  # A disabled bar keeps no clock.
    bar.initial = bar.n
    bar.start_t = bar.last_print_t = bar._time()  # tqdm ends a line only if it printed since.
    bar.refresh()


# OS errors as the C library words them, found inside the longer messages Orbax and
# TensorStore wrap them in (e.g. RESOURCE_EXHAUSTED: Error writing ...: No space left on device).
_OS_ERRORS = ("No space left on device", "Disk quota exceeded", "Read-only file system",
              "Permission denied", "No such file or directory")


def save_error_line(directory: str, error: BaseException) -> str:
  """One line for an error of a checkpoint save under ``directory``: the step (from Orbax's
  temporary directory name, if the message has it), the OS error if one is named, else the
  error's first line, and what to do."""
  text = str(error)
  step = re.search(r"/(\d+)\.orbax-checkpoint-tmp", text)
  cause = next((m for m in _OS_ERRORS if m in text), None)
  cause = (f"{cause} ({type(error).__name__})" if cause else
           f"{type(error).__name__}: {(text.strip().splitlines() or [''])[0][:300]}")
  what = f"step {step.group(1)}" if step else "a checkpoint"
  return (f"saving {what} under {directory} failed: {cause}. Free disk space or fix the "
          "directory's permissions, then run the same command to resume from the last saved step")


@contextlib.contextmanager
def _saving(directory: str) -> Iterator[None]:
  """An error of a checkpoint save (a full disk, a directory gone) as one ``CheckpointError``
  line (``save_error_line``)."""
  try:
    yield
  except (CheckpointError, ConfigError, NonFiniteLossError):
    raise
  except Exception as e:  # Orbax and the OS raise many kinds; the user needs one line.
    raise CheckpointError(save_error_line(directory, e)) from e


def fit(config: ml_collections.ConfigDict | RunOptions, workdir: str,
        model: nn.Module | None = None, dataset: Dataset | None = None,
        task: TaskLike | None = None, progress: bool = True,
        desc: str | None = None) -> tuple[TrainState, dict[str, Any]]:
  """Trains the model of ``config`` (a config, or its ``fjt.options.RunOptions``) and evaluates
  it; returns (final state, summary).

  ``model``, ``dataset`` and ``task`` replace ``config.model``, ``config.data`` and
  ``config.task`` when given (a Linen module, a ``fjt.Dataset``, a task name, ``fjt.Task`` or
  ``loss_fn``). ``desc`` labels the progress bar (default ``train``, or ``fine-tune`` for a run
  that starts from ``init_from``). A ``pretrain`` config is trained first by ``fjt.fit``
  (``fjt.experiment``), which composes runs; this loop refuses one it was not given the result of.

  Before any work: the settings are checked (``fjt.options``); the processes of
  a multi-process run compare their configs (``fjt.distributed.check_same_config``); the workdir
  is locked (``fjt.runs.WorkdirLock``) and, if it holds checkpoints, the config is compared
  with the one they were made with (``fjt.runs.check_rerun``): a change that alters the
  result is an error, a larger ``train.steps`` continues the run (the learning-rate schedule
  becomes that of the new total from the step reached).

  Resumes from the newest complete checkpoint in ``WORKDIR/checkpoints`` if there is one (a
  finished run is only evaluated again), saying so in one line. SIGTERM or SIGINT finishes the
  current step, saves it and raises ``fjt.preemption.StoppedBySignal``. Over the mesh of
  ``config.mesh`` (default: every device on the ``data`` axis): the batch split over ``data`` x
  ``fsdp``, the state created and kept sharded by ``config.sharding_rules`` (``fjt.sharding``;
  a run may resume on another mesh), across all the processes of a ``jax.distributed`` run; a
  peer that stops answering is ``fjt.distributed.PeerLostError``; only process 0 writes files
  other than checkpoints. Writes to ``workdir`` (``fjt.logs.RunLog``):
  ``config.json``, ``metrics.jsonl`` (one object per logged step: step, split, metrics),
  TensorBoard events, ``metrics.png``, checkpoints, and ``summary.json`` =
  ``{"step": final step, "eval": final eval metrics}``.
  """
  options = config if isinstance(config, RunOptions) else RunOptions.from_config(config)
  if options.init.pretrain is not None and not options.init.init_from:
    raise ConfigError("config key 'pretrain': fjt.train.fit runs one loop; train the pretrain "
                      "config first with fjt.fit (fjt.experiment.fit) or scripts/train.py")
  build = functools.partial(single_model, options, workdir, model, dataset, task, desc)
  return run(options, workdir, build, progress)


def run(options: RunOptions, workdir: str, build: Callable[[], Program],
        progress: bool = True) -> tuple[Any, dict[str, Any]]:
  """THE loop: checks the workdir, then runs the ``Program`` that ``build()`` returns (a single
  model, ``single_model``, or replica rounds, ``fjt.replicas.program``); returns its
  ``finish``: (result state, summary). Everything ``fit`` says of checks, checkpoints, resumes,
  signals, logs and processes holds for every program."""
  accelerators.request_determinism(options.accelerator.deterministic)
  prepare_workdir(workdir, subdirs=("checkpoints",))
  distributed.check_same_config(runs.as_record(options.config), os.path.abspath(workdir),
                                options.distributed.timeout_s)
  with runs.WorkdirLock(workdir, enabled=jax.process_index() == 0), \
      accelerators.precision(options.accelerator.matmul_precision):
    has_results = bool(checkpoint.step_dirs(os.path.join(workdir, "checkpoints")))
    fingerprint = data_fingerprint(options.data)
    changes = runs.check_rerun(workdir, options.config, has_results, fingerprint)
    return _run(options, workdir, changes, build(), progress, fingerprint)


def single_model(options: RunOptions, workdir: str, model: nn.Module | None,
                 dataset: Dataset | None, task: TaskLike | None,
                 desc: str | None = None) -> Program:
  """One model trained data parallel over the mesh of ``options``: the ``Program`` of ``fit``."""
  train = options.train
  dataset = dataset if dataset is not None else fjt_data.load_dataset(options.data)
  check_batch_size(train.batch_size, dataset)
  task = resolve_task(options.task, dataset, task)
  mesh = _create_mesh(options)
  model = create_model(options.model) if model is None else model
  check_layout(model, dataset)
  example = jax.tree.map(lambda v: v[:1], dataset.train["x"])
  try:
    model, tx, state = create_state(options, example, model, train.rng_streams, mesh)
  except (ValueError, TypeError) as e:  # The model cannot take the data's inputs.
    if isinstance(e, ConfigError):
      raise
    shapes = jax.tree.map(np.shape, example)
    raise ConfigError(f"config key 'model': {type(model).__name__} cannot take the data's "
                      f"inputs of shape {shapes}: {e}".splitlines()[0]) from e
  state_sharding = sharding.shardings_of(state)
  check_model_fits_data(model, state, dataset, task)
  averaging = TemporalAveraging.from_options(options.averaging)
  train_step = make_train_step(model, tx, task, averaging=averaging, mesh=mesh,
                               state_sharding=state_sharding, rng_streams=train.rng_streams,
                               grad_accum_steps=train.grad_accum_steps)
  eval_step = make_eval_step(model, task, mesh=mesh, variables_sharding={
      "params": state_sharding.base or state_sharding.params,  # LoRA: merged onto the base.
      "batch_stats": state_sharding.batch_stats})
  names = metric_names(model, state, dataset, task)
  rows = sharding.process_rows(train.batch_size, mesh)

  def step(state, i):
    local = fjt_data.get_batch(dataset.train, options.seed, i, train.batch_size, rows)
    return train_step(state, sharding.put_split(local, mesh, train.batch_size))

  def finish(state, eval_metrics):
    summary = {"step": int(sharding.to_host(state.step)),
               "eval": {**eval_metrics, **data_baselines(dataset)}}
    for name, path in (("pretrain", os.path.join(workdir, "pretrain", "summary.json")),
                       ("init_from", os.path.join(workdir, "init_from.json"))):
      if (info := _read_json(path)) is not None:
        summary[name] = info
    return state, summary

  return Program(
      state=state, ends=range(1, train.steps + 1), step=step,
      evaluate=lambda state: evaluate(eval_step, state, dataset.test, train.eval_batch_size,
                                      mesh=mesh),
      log_at=lambda i, done: done % train.log_every == 0,
      eval_at=lambda i, done: done % train.eval_every == 0,
      row=mean_row, check=check_finite,
      start=lambda state: sharding.put_like(
          _fine_tune_start(options, workdir, state, tx, averaging), state_sharding),
      finish=finish,
      task=task.name, metric_names=names + [f"{p}_{k}" for p in averaging.names for k in names],
      headline=task.headline, mode=task.mode, baselines=baseline_lines(dataset),
      lockstep=sharding.needs_lockstep(mesh),
      desc=desc or ("fine-tune" if options.init.fine_tune else "train"))


def _crossed(every: int, before: int, done: int) -> bool:
  """Whether a multiple of ``every`` lies in ``(before, done]``."""
  return done // every > before // every


def _save_what_can_be_saved(checkpointer: checkpoint.RunCheckpointer, step: int,
                            state: Any) -> None:
  """After a log file could not be written: saves ``step`` if its state is finite and the disk
  takes it, said in one line. A save that fails too leaves the last complete checkpoint as it
  was (Orbax renames a step into place only when it is whole); its error is the log's."""
  try:
    check_finite_state(state, step)
    checkpointer.save(step, state)
    checkpointer.wait_until_finished()
  except Exception:  # The disk is full: the log's error is the one to report.
    return
  say(f"saved step {step} before stopping")


def _check_eval(state: Any, metrics: dict[str, float], step: int) -> None:
  """A non-finite eval metric is an error: naming the state's first non-finite array if the
  state is the cause, else the split."""
  if not all(np.isfinite(v) for v in metrics.values()):
    check_finite_state(state, step)
    check_finite_eval(metrics, step)


def _run(options: RunOptions, workdir: str, changes: list[runs.Change], program: Program,
         progress: bool, fingerprint: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
  main = jax.process_index() == 0
  ckpt = options.checkpoint
  best_mode = ckpt.best_mode or program.mode
  if ckpt.best_metric and ckpt.best_metric not in program.metric_names:
    raise ConfigError(f"config key 'checkpoint.best_metric': {ckpt.best_metric!r} is not a "
                      f"metric of task {program.task!r}; known: {list(program.metric_names)}")
  checkpointer = checkpoint.RunCheckpointer(workdir, ckpt.max_to_keep, ckpt.best_metric,
                                            best_mode, {"config": runs.as_record(options.config),
                                                        "data": fingerprint})
  state, start = checkpointer.restore_latest(program.state, fallback=ckpt.fallback)
  total = program.total
  if start == 0:
    state = program.start(state)
  elif main:
    _say_resuming(start, total, os.path.join(checkpointer.directory, str(start)), changes)
  checkpoint_every = ckpt.every_steps or total
  watchdog = (distributed.Watchdog(options.distributed.timeout_s)
              if jax.process_count() > 1 else None)
  log = RunLog(workdir, runs.record_file(options.config, fingerprint), start_step=start,
               enabled=main)
  first = program.iteration_after(start)
  window, window_start, tic = [], start, time.perf_counter()
  evaluated_at, eval_metrics, done, lost = -1, {}, start, None
  try:
    with StopSignals() as stop, tqdm(total=total, initial=start, disable=not (progress and main),
                                     desc=program.desc, unit="step", dynamic_ncols=True,
                                     smoothing=0) as bar:
      for i in range(first, len(program.ends)):
        before, done = done, program.ends[i]
        state, metrics = program.step(state, i)
        if program.lockstep:
          jax.block_until_ready(metrics)
        window.append(metrics)
        if i == first:
          _count_first_step(bar, done - before)
        else:
          bar.update(done - before)
        save_now = _crossed(checkpoint_every, before, done) or done == total
        if program.log_at(i, done) or save_now:
          window = sharding.to_host(window)  # The only host sync of the training loop.
          program.check(window, window_start)  # Before a save: never checkpoint a NaN state.
          toc = time.perf_counter()
          logged = program.row(window)
          logged["steps_per_sec"] = (done - window_start) / (toc - tic)
          log.write(done, "train", logged)
          bar.set_postfix(loss=f"{logged['loss']:.4f}", refresh=False)
          window, window_start, tic = [], done, toc
        if program.eval_at(i, done) or done == total:
          eval_metrics, evaluated_at = program.evaluate(state), done
          log.write(done, "eval", eval_metrics)
          _check_eval(state, eval_metrics, done)
          if main and progress:
            bar.write(f"step {done}: " + ", ".join(f"eval {k} {v:.4f}" for k, v in eval_metrics.items()))
          tic = time.perf_counter()  # Eval time is not training throughput.
        with _saving(checkpointer.directory):
          if save_now:
            check_finite_state(state, done)  # Never checkpoint a non-finite state.
            checkpointer.save(done, state, eval_metrics if evaluated_at == done else None)
          else:
            checkpointer.raise_if_failed()  # A failed save stops the run at the next step.
        if watchdog:
          watchdog.beat(done)
        if stop.requested(done) and done < total:  # At the last step the run just finishes.
          with _saving(checkpointer.directory):
            if not save_now:
              check_finite_state(state, done)
              checkpointer.save(done, state)
            checkpointer.wait_until_finished()
          raise StoppedBySignal(done, stop.signal_name, checkpointer.directory)
    if evaluated_at != total:  # A finished run started again: report, do not retrain.
      eval_metrics = program.evaluate(state)
      _check_eval(state, eval_metrics, done)
  except LogWriteError:
    if main and jax.process_count() == 1:  # Others would wait on process 0 in the save.
      _save_what_can_be_saved(checkpointer, done, state)
    raise
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    lost = distributed.peer_lost(e, done + 1)  # A collective failed: a peer is gone.
    raise lost from e
  finally:
    log.close()
    if lost is None:  # A save would wait on the lost peer.
      with _saving(checkpointer.directory):
        checkpointer.close()  # Waits for the last save; raises its errors.
    if watchdog:
      watchdog.stop()

  result, summary = program.finish(state, eval_metrics)
  log.finish(summary, program.headline, program.baselines)
  return result, summary
