"""The single-model loop: data parallel over the mesh, checkpointed, resumable."""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from fjt import checkpoint, sharding
from fjt import data as fjt_data
from fjt.averaging import TemporalAveraging
from fjt.checkpoint import LoadReport
from fjt.config import ConfigError, with_run_defaults
from fjt.data import Dataset
from fjt.logs import RunLog
from fjt.models import create_model
from fjt.options import CheckpointOptions, TrainOptions
from fjt.state import TrainState, create_from_config, model_kwargs
from fjt.steps import TaskLike, evaluate, make_eval_step, make_train_step
from fjt.tasks import Task, get_task


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


def _check_finite(window: list[dict[str, np.ndarray]], first_step: int) -> None:
  for offset, metrics in enumerate(window):
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
      raise NonFiniteLossError(
          f"training loss is {loss} at step {first_step + offset + 1}; lower optimizer.learning_rate "
          "or set optimizer.grad_clip_norm")


def prepare_workdir(workdir: str) -> str:
  """Creates ``workdir`` and checks that files can be written there."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".fjt_write_test_{jax.process_index()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"workdir {workdir!r} is not writable: {e.strerror or e}") from e
  return workdir


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
    fit(config.pretrain, pretrain_dir, progress=progress)
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
  mesh = sharding.create_mesh(config.get("mesh") or None)
  if "data" not in mesh.shape:
    raise ConfigError(f"config key 'mesh': needs a 'data' axis, got {dict(mesh.shape)}")
  for key, size in (("batch_size", options.batch_size // options.grad_accum_steps),
                    ("eval_batch_size", options.eval_batch_size)):
    if size % mesh.shape["data"]:
      raise ConfigError(f"config key 'train.{key}': {size} rows do not split over the "
                        f"{mesh.shape['data']} devices of the 'data' axis; use a multiple of it")
  return mesh


def resolve_task(config: ml_collections.ConfigDict, dataset: Dataset,
                 task: TaskLike | None = None) -> Task:
  """The task of a run: ``task`` if given, else ``config.task``, else the dataset's own."""
  try:
    return get_task(task if task is not None else (config.get("task") or dataset.task))
  except ValueError as e:
    raise ConfigError(f"config key 'task': {e}") from e


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


def fit(config: ml_collections.ConfigDict, workdir: str, model: nn.Module | None = None,
        dataset: Dataset | None = None, task: TaskLike | None = None,
        progress: bool = True) -> tuple[TrainState, dict[str, Any]]:
  """Trains the model of ``config`` and evaluates it; returns (final state, summary).

  ``model``, ``dataset`` and ``task`` replace ``config.model``, ``config.data`` and
  ``config.task`` when given (a Linen module, a ``fjt.Dataset``, a task name, ``fjt.Task`` or
  ``loss_fn``). Resumes from the newest complete checkpoint in ``WORKDIR/checkpoints`` if there
  is one (a finished run is only evaluated again). Data parallel over the mesh of
  ``config.mesh`` (default: every device on one ``data`` axis), across all the processes of a
  ``jax.distributed`` run; only process 0 writes files other than checkpoints. Writes to
  ``workdir`` (``fjt.logs.RunLog``): ``config.json``, ``metrics.jsonl`` (one object per logged
  step: step, split, metrics), TensorBoard events, ``metrics.png``, checkpoints, and
  ``summary.json`` = ``{"step": final step, "eval": final eval metrics}``.
  """
  config = with_run_defaults(config)
  options, ckpt = TrainOptions.from_config(config), CheckpointOptions.from_config(config)
  main = jax.process_index() == 0
  prepare_workdir(workdir)
  dataset = dataset if dataset is not None else fjt_data.load_dataset(config.data)
  if options.batch_size > dataset.num_train:
    raise ConfigError(f"config key 'train.batch_size': {options.batch_size} is larger than the "
                      f"{dataset.num_train} training examples")
  task = resolve_task(config, dataset, task)
  mesh = _create_mesh(config, options)
  model = create_model(config.model) if model is None else model
  check_layout(model, dataset)
  example = jax.tree.map(lambda v: v[:1], dataset.train["x"])
  model, tx, state = create_from_config(config, example, model, options.rng_streams)
  check_model_fits_data(model, state, dataset, task)
  averaging = TemporalAveraging.from_config(config)
  train_step = make_train_step(model, tx, task, averaging=averaging, mesh=mesh,
                               rng_streams=options.rng_streams,
                               grad_accum_steps=options.grad_accum_steps)
  eval_step = make_eval_step(model, task, mesh=mesh)
  best_mode = ckpt.best_mode or task.mode
  if ckpt.best_metric:
    known = metric_names(model, state, dataset, task)
    known += [f"{p}_{k}" for p in averaging.names for k in known]
    if ckpt.best_metric not in known:
      raise ConfigError(f"config key 'checkpoint.best_metric': {ckpt.best_metric!r} is not a "
                        f"metric of task {task.name!r}; known: {known}")

  checkpointer = checkpoint.RunCheckpointer(workdir, ckpt.max_to_keep, ckpt.best_metric,
                                            best_mode)
  state, start = checkpointer.restore_latest(sharding.put_replicated(state, mesh),
                                             fallback=ckpt.fallback)
  if start == 0:
    state = sharding.put_replicated(_fine_tune_start(config, workdir, state, tx, progress), mesh)

  def run_eval(state):
    return evaluate(eval_step, state, dataset.test, options.eval_batch_size, mesh=mesh)

  steps, checkpoint_every = options.steps, ckpt.every_steps or options.steps
  rows = sharding.process_rows(options.batch_size, mesh)
  lockstep = sharding.needs_lockstep(mesh)
  watchdog = (sharding.Watchdog(float(config.distributed.timeout_s))
              if jax.process_count() > 1 else None)
  log = RunLog(workdir, config, start_step=start, enabled=main)
  window, window_start, tic = [], start, time.perf_counter()
  evaluated_at, eval_metrics = -1, {}
  try:
    with tqdm(total=steps, initial=start, disable=not (progress and main), desc="train",
              unit="step", dynamic_ncols=True) as bar:
      for step in range(start, steps):
        local = fjt_data.get_batch(dataset.train, options.seed, step, options.batch_size, rows)
        state, metrics = train_step(state, sharding.put_split(local, mesh, options.batch_size))
        if lockstep:
          jax.block_until_ready(metrics)
        window.append(metrics)
        bar.update()
        done = step + 1
        save_now = done % checkpoint_every == 0 or done == steps
        if done % options.log_every == 0 or save_now:
          window = sharding.to_host(window)  # The only host sync of the training loop.
          _check_finite(window, window_start)  # Before a save: never checkpoint a NaN state.
          toc = time.perf_counter()
          logged = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
          logged["steps_per_sec"] = len(window) / (toc - tic)
          log.write(done, "train", logged)
          bar.set_postfix(loss=f"{logged['loss']:.4f}", refresh=False)
          window, window_start, tic = [], done, toc
        if done % options.eval_every == 0 or done == steps:
          eval_metrics, evaluated_at = run_eval(state), done
          log.write(done, "eval", eval_metrics)
          if main:
            bar.write(f"step {done}: " + ", ".join(f"eval {k} {v:.4f}" for k, v in eval_metrics.items()))
          tic = time.perf_counter()  # Eval time is not training throughput.
        if save_now:
          checkpointer.save(done, state, eval_metrics if evaluated_at == done else None)
        if watchdog:
          watchdog.beat()
    if evaluated_at != steps:  # A finished run started again: report, do not retrain.
      eval_metrics = run_eval(state)
  finally:
    log.close()
    checkpointer.close()  # Waits for the last save; raises its errors.
    if watchdog:
      watchdog.stop()

  baselines = {}
  if "unigram_perplexity" in dataset.info:
    eval_metrics["unigram_perplexity"] = dataset.info["unigram_perplexity"]
    baselines["unigram model"] = dataset.info["unigram_perplexity"]
  summary = {"step": int(sharding.to_host(state.step)), "eval": eval_metrics}
  for name, path in (("pretrain", os.path.join(workdir, "pretrain", "summary.json")),
                     ("init_from", os.path.join(workdir, "init_from.json"))):
    if (info := _read_json(path)) is not None:
      summary[name] = info
  log.finish(summary, task.headline, baselines)
  return state, summary
