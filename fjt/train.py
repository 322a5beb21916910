"""The single-model loop: data parallel over the mesh, checkpointed, resumable."""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
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
from fjt.config import ConfigError, with_run_defaults
from fjt.data import Dataset
from fjt.logs import RunLog, say
from fjt.models import create_model
from fjt.optim import check_optimizer_config
from fjt.options import (AcceleratorOptions, CheckpointOptions, ShardingOptions, TrainOptions,
                         check_model_widths)
from fjt.preemption import StopSignals, StoppedBySignal
from fjt.state import TrainState, create_from_config, model_kwargs
from fjt.steps import TaskLike, evaluate, make_eval_step, make_train_step
from fjt.tasks import Task, get_task


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


def check_finite(window: list[dict[str, np.ndarray]], first_step: int) -> None:
  """Raises ``NonFiniteLossError`` naming the step of the first NaN or infinite ``loss`` in
  ``window``, the host metrics of the steps after ``first_step``."""
  for offset, metrics in enumerate(window):
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
      raise NonFiniteLossError(
          f"training loss is {loss} at step {first_step + offset + 1}; lower optimizer.learning_rate "
          "or set optimizer.grad_clip_norm")


def prepare_workdir(workdir: str, subdirs: Sequence[str] = ()) -> str:
  """Creates ``workdir`` and its ``subdirs`` and checks that files can be written in each, so
  a read-only disk or directory is found before training, not at the first save."""
  for directory in (workdir, *(os.path.join(workdir, d) for d in subdirs)):
    try:
      os.makedirs(directory, exist_ok=True)
      probe = os.path.join(directory, f".fjt_write_test_{jax.process_index()}")
      with open(probe, "w") as f:
        f.write("ok")
      os.remove(probe)
    except OSError as e:
      what = "workdir" if directory == workdir else "directory"
      raise ConfigError(f"{what} {directory!r} is not writable: {e.strerror or e}; fix its "
                        "permissions or use another --workdir") from e
  return workdir


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
  or a variables / params tree saved by ``fjt.checkpoint.save``) into ``state``.

  Paths matching ``skip`` and paths missing from the checkpoint keep ``state``'s
  values; a shape difference outside ``skip`` is an error. Returns the state
  (step, optimizer state and rng untouched) and the load report.
  """
  saved = checkpoint.saved_shapes(path)
  if any(p.startswith("params/") for p in saved):
    variables, report = checkpoint.load(path, state.variables, strict=False, skip=skip)
  else:  # A params tree on its own, like torch.save(model.state_dict()).
    params, report = checkpoint.load(path, state.params, strict=False,
                                     skip=[re.sub(r"^\^?params/", "", s) for s in skip])
    variables = {"params": params, "batch_stats": state.batch_stats}
  return state.replace(params=variables["params"], batch_stats=variables["batch_stats"]), report


def _fine_tune_start(config, workdir: str, state: TrainState, tx, progress: bool) -> TrainState:
  """The state a new run starts from: fresh, or ``init_from`` (after training
  ``config.pretrain`` into ``WORKDIR/pretrain`` when that is set). The load
  report goes to ``WORKDIR/init_from.json``."""
  init_from = config.get("init_from", "")
  if config.get("pretrain"):
    pretrain_dir = os.path.join(workdir, "pretrain")
    fit(config.pretrain, pretrain_dir, progress=progress, desc="pretrain")
    init_from = init_from or pretrain_dir
  if not init_from:
    return state
  state, report = init_from_checkpoint(state, init_from, tuple(config.get("init_skip", ())))
  state = state.replace(averages=TemporalAveraging.from_config(config).init(state.variables))
  with open(os.path.join(workdir, "init_from.json"), "w", encoding="utf-8") as f:
    json.dump({"path": init_from, "skipped": report.skipped, "missing": report.missing,
               "mismatched": report.mismatched}, f, indent=2)
  return state.replace(opt_state=tx.init(state.params))


def _read_json(path: str) -> dict[str, Any] | None:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _create_mesh(config, options: TrainOptions) -> Mesh:
  return sharding.create_train_mesh(
      ShardingOptions.from_config(config).mesh,
      {"train.batch_size": options.batch_size // options.grad_accum_steps,
       "train.eval_batch_size": options.eval_batch_size})


def resolve_task(config: ml_collections.ConfigDict, dataset: Dataset,
                 task: TaskLike | None = None) -> Task:
  """The task of a run: ``task`` if given, else ``config.task``, else the dataset's own."""
  try:
    return get_task(task if task is not None else (config.get("task") or dataset.task))
  except ValueError as e:
    raise ConfigError(f"config key 'task': {e}") from e


_DATA_BASELINES = {"unigram_perplexity": "unigram model"}  # dataset.info key: plot label.


def data_baselines(dataset: Dataset) -> dict[str, float]:
  """The metrics of models of the data alone that ``dataset.info`` knows (``unigram_perplexity``
  of text), reported in summary.json's ``eval`` beside a run's own."""
  return {k: dataset.info[k] for k in _DATA_BASELINES if k in dataset.info}


def baseline_lines(dataset: Dataset) -> dict[str, float]:
  """``data_baselines`` by plot label, the horizontal lines of ``metrics.png``."""
  return {_DATA_BASELINES[k]: v for k, v in data_baselines(dataset).items()}


def check_layout(model: nn.Module, dataset: Dataset) -> None:
  """An image layout the model does not take is an error that says what to move, raised
  before the model is initialised (Flax would fail on the shapes with a ZeroDivisionError)."""
  wants, has = getattr(model, "input_layout", ""), dataset.info.get("layout", "")
  if wants and has and wants != has:
    shape = np.shape(jax.tree.leaves(dataset.train["x"])[0])
    hint = ("move the channel axis to the end (x = np.moveaxis(x, 1, -1)) and save again"
            if (has, wants) == ("nchw", "nhwc") else f"convert the images to {wants.upper()}")
    raise ConfigError(
        f"config key 'data.layout': the data's images are {has.upper()} {shape} but "
        f"{type(model).__name__} takes {wants.upper()}; {hint}")


def check_model_fits_data(model: nn.Module, state: TrainState, dataset: Dataset,
                          task: Task) -> None:
  """An output width that is not the data's number of classes is an error naming the key."""
  example = jax.tree.map(lambda v: v[:1], dataset.train["x"])
  outputs = jax.eval_shape(lambda v: model.apply(v, example, **model_kwargs(model, False)),
                           state.variables)
  width = outputs.shape[-1] if outputs.ndim else None
  if dataset.num_classes is not None and task.name != "regression" and \
      width != dataset.num_classes:
    key = next((f"model.{a}" for a in ("vocab_size", "num_classes") if hasattr(model, a)), "model")
    raise ConfigError(f"config key {key!r}: {type(model).__name__} outputs {width} classes but "
                      f"the data has {dataset.num_classes}")


def metric_names(model: nn.Module, state: TrainState, dataset: Dataset, task: Task) -> list[str]:
  """The names of the metrics ``evaluate`` reports for ``task`` on ``dataset`` (without the
  ``ema_``/``swa_`` copies), found by tracing one batch, not computing it."""
  batch = next(fjt_data.eval_batches(jax.tree.map(lambda v: v[:1], dataset.test), 1))
  sums = jax.eval_shape(
      lambda v: task.eval_sums(model.apply(v, batch["x"], **model_kwargs(model, False)), batch),
      state.variables)
  return sorted(task.metrics({k: np.float64(1.0) for k in sums}))


def _count_first_step(bar: tqdm) -> None:
  """Counts the first step of a process (which compiled) and starts the bar's clock after it,
  so rate and ETA (``smoothing=0``: steps / seconds since then) leave the compile time out."""
  bar.n += 1
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
  except (CheckpointError, ConfigError):
    raise
  except Exception as e:  # Orbax and the OS raise many kinds; the user needs one line.
    raise CheckpointError(save_error_line(directory, e)) from e


def fit(config: ml_collections.ConfigDict, workdir: str, model: nn.Module | None = None,
        dataset: Dataset | None = None, task: TaskLike | None = None,
        progress: bool = True, desc: str | None = None) -> tuple[TrainState, dict[str, Any]]:
  """Trains the model of ``config`` and evaluates it; returns (final state, summary).

  ``model``, ``dataset`` and ``task`` replace ``config.model``, ``config.data`` and
  ``config.task`` when given (a Linen module, a ``fjt.Dataset``, a task name, ``fjt.Task`` or
  ``loss_fn``). ``desc`` labels the progress bar (default ``train``, or ``fine-tune`` for a run
  that starts from ``init_from``/``pretrain``).

  Before any work: the settings are checked (``fjt.options``, ``fjt.optim``); the processes of
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
  a run may resume on another mesh), across all the processes of a ``jax.distributed`` run; a peer that stops answering is ``fjt.distributed.PeerLostError``;
  only process 0 writes files other than checkpoints. Writes to ``workdir`` (``fjt.logs.RunLog``):
  ``config.json``, ``metrics.jsonl`` (one object per logged step: step, split, metrics),
  TensorBoard events, ``metrics.png``, checkpoints, and ``summary.json`` =
  ``{"step": final step, "eval": final eval metrics}``.
  """
  config = with_run_defaults(config)
  options, ckpt = TrainOptions.from_config(config), CheckpointOptions.from_config(config)
  accel = AcceleratorOptions.from_config(config)
  check_model_widths(config)
  check_optimizer_config(config.optimizer)
  accelerators.request_determinism(accel.deterministic)
  prepare_workdir(workdir, subdirs=("checkpoints",))
  distributed.check_same_config(runs.as_record(config), os.path.abspath(workdir),
                                float(config.distributed.timeout_s))
  with runs.WorkdirLock(workdir, enabled=jax.process_index() == 0), \
      accelerators.precision(accel.matmul_precision):
    has_results = bool(checkpoint.step_dirs(os.path.join(workdir, "checkpoints")))
    changes = runs.check_rerun(workdir, config, has_results)
    return _fit(config, workdir, options, ckpt, changes, model, dataset, task, progress, desc)


def _fit(config: ml_collections.ConfigDict, workdir: str, options: TrainOptions,
         ckpt: CheckpointOptions, changes: list[runs.Change], model: nn.Module | None,
         dataset: Dataset | None, task: TaskLike | None, progress: bool,
         desc: str | None) -> tuple[TrainState, dict[str, Any]]:
  main = jax.process_index() == 0
  dataset = dataset if dataset is not None else fjt_data.load_dataset(config.data)
  if options.batch_size > dataset.num_train:
    raise ConfigError(f"config key 'train.batch_size': {options.batch_size} is larger than the "
                      f"{dataset.num_train} training examples")
  task = resolve_task(config, dataset, task)
  mesh = _create_mesh(config, options)
  model = create_model(config.model) if model is None else model
  check_layout(model, dataset)
  example = jax.tree.map(lambda v: v[:1], dataset.train["x"])
  try:
    model, tx, state = create_from_config(config, example, model, options.rng_streams, mesh)
  except (ValueError, TypeError) as e:  # The model cannot take the data's inputs.
    if isinstance(e, ConfigError):
      raise
    shapes = jax.tree.map(np.shape, example)
    raise ConfigError(f"config key 'model': {type(model).__name__} cannot take the data's "
                      f"inputs of shape {shapes}: {e}".splitlines()[0]) from e
  state_sharding = sharding.shardings_of(state)
  check_model_fits_data(model, state, dataset, task)
  averaging = TemporalAveraging.from_config(config)
  train_step = make_train_step(model, tx, task, averaging=averaging, mesh=mesh,
                               state_sharding=state_sharding, rng_streams=options.rng_streams,
                               grad_accum_steps=options.grad_accum_steps)
  eval_step = make_eval_step(model, task, mesh=mesh, variables_sharding=state_sharding.variables)
  best_mode = ckpt.best_mode or task.mode
  if ckpt.best_metric:
    known = metric_names(model, state, dataset, task)
    known += [f"{p}_{k}" for p in averaging.names for k in known]
    if ckpt.best_metric not in known:
      raise ConfigError(f"config key 'checkpoint.best_metric': {ckpt.best_metric!r} is not a "
                        f"metric of task {task.name!r}; known: {known}")

  checkpointer = checkpoint.RunCheckpointer(workdir, ckpt.max_to_keep, ckpt.best_metric,
                                            best_mode)
  state, start = checkpointer.restore_latest(state, fallback=ckpt.fallback)
  if start == 0:
    state = sharding.put_like(_fine_tune_start(config, workdir, state, tx, progress),
                              state_sharding)
  elif main:
    _say_resuming(start, options.steps, os.path.join(checkpointer.directory, str(start)), changes)

  def run_eval(state):
    return evaluate(eval_step, state, dataset.test, options.eval_batch_size, mesh=mesh)

  steps, checkpoint_every = options.steps, ckpt.every_steps or options.steps
  rows = sharding.process_rows(options.batch_size, mesh)
  lockstep = sharding.needs_lockstep(mesh)
  watchdog = (distributed.Watchdog(float(config.distributed.timeout_s))
              if jax.process_count() > 1 else None)
  log = RunLog(workdir, config, start_step=start, enabled=main)
  window, window_start, tic = [], start, time.perf_counter()
  evaluated_at, eval_metrics, done, lost = -1, {}, start, None
  desc = desc or ("fine-tune" if config.get("init_from") or config.get("pretrain") else "train")
  try:
    with StopSignals() as stop, tqdm(total=steps, initial=start, disable=not (progress and main),
                                     desc=desc, unit="step", dynamic_ncols=True,
                                     smoothing=0) as bar:
      for step in range(start, steps):
        local = fjt_data.get_batch(dataset.train, options.seed, step, options.batch_size, rows)
        state, metrics = train_step(state, sharding.put_split(local, mesh, options.batch_size))
        if lockstep:
          jax.block_until_ready(metrics)
        window.append(metrics)
        if step == start:
          _count_first_step(bar)
        else:
          bar.update()
        done = step + 1
        save_now = done % checkpoint_every == 0 or done == steps
        if done % options.log_every == 0 or save_now:
          window = sharding.to_host(window)  # The only host sync of the training loop.
          check_finite(window, window_start)  # Before a save: never checkpoint a NaN state.
          toc = time.perf_counter()
          logged = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
          logged["steps_per_sec"] = len(window) / (toc - tic)
          log.write(done, "train", logged)
          bar.set_postfix(loss=f"{logged['loss']:.4f}", refresh=False)
          window, window_start, tic = [], done, toc
        if done % options.eval_every == 0 or done == steps:
          eval_metrics, evaluated_at = run_eval(state), done
          log.write(done, "eval", eval_metrics)
          if main and progress:
            bar.write(f"step {done}: " + ", ".join(f"eval {k} {v:.4f}" for k, v in eval_metrics.items()))
          tic = time.perf_counter()  # Eval time is not training throughput.
        with _saving(checkpointer.directory):
          if save_now:
            checkpointer.save(done, state, eval_metrics if evaluated_at == done else None)
          else:
            checkpointer.raise_if_failed()  # A failed save stops the run at the next step.
        if watchdog:
          watchdog.beat(done)
        if stop.requested(done) and done < steps:  # At the last step the run just finishes.
          with _saving(checkpointer.directory):
            if not save_now:
              checkpointer.save(done, state)
            checkpointer.wait_until_finished()
          raise StoppedBySignal(done, stop.signal_name, checkpointer.directory)
    if evaluated_at != steps:  # A finished run started again: report, do not retrain.
      eval_metrics = run_eval(state)
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

  eval_metrics.update(data_baselines(dataset))
  summary = {"step": int(sharding.to_host(state.step)), "eval": eval_metrics}
  for name, path in (("pretrain", os.path.join(workdir, "pretrain", "summary.json")),
                     ("init_from", os.path.join(workdir, "init_from.json"))):
    if (info := _read_json(path)) is not None:
      summary[name] = info
  log.finish(summary, task.headline, baseline_lines(dataset))
  return state, summary
