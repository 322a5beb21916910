"""Pure train and eval steps, and the loop that composes them."""

from __future__ import annotations

import functools
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from jax.sharding import Mesh

from fjt import checkpoint, sharding
from fjt import data as fjt_data
from fjt.checkpoint import LoadReport
from fjt.config import ConfigError, positive_int, require
from fjt.logs import MetricWriter, plot_metrics
from fjt.averaging import TemporalAveraging
from fjt.state import TrainState, create_from_config

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


def _jit(fn, mesh: Mesh | None, **kwargs):
  """``jax.jit``; over a mesh, the state (argument 0) and outputs replicated and
  the batch (argument 1) split along the mesh's ``data`` axis."""
  if mesh is None:
    return jax.jit(fn, **kwargs)
  return jax.jit(fn, in_shardings=(sharding.replicated(mesh), sharding.split(mesh)),
                 out_shardings=sharding.replicated(mesh), **kwargs)


def train_step_fn(model: nn.Module, tx: optax.GradientTransformation,
                  averaging: TemporalAveraging = TemporalAveraging()
                  ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """The pure, un-jitted ``train_step(state, batch) -> (state, metrics)``.

  ``batch`` holds ``x`` (model inputs) and ``y`` (int32 labels ``(B,)``). The loss
  is the mean softmax cross-entropy; BatchNorm statistics are those of the batch
  and the running averages are updated, as are the EMA/SWA weights of
  ``averaging``. Metrics: ``loss``, ``accuracy`` (scalars). Compose it freely
  (``jax.vmap`` over replicas, ``jax.lax.scan`` over steps); ``make_train_step``
  is it jitted.
  """

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    def loss_fn(params):
      logits, updates = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, batch["x"], train=True,
          mutable=["batch_stats"], rngs={"dropout": jax.random.fold_in(state.rng, state.step)})
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
      return loss, (logits, updates.get("batch_stats", {}))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    averages = averaging.update(state.averages, {"params": params, "batch_stats": batch_stats},
                                state.step + 1)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state, averages=averages)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["y"])
    return new_state, {"loss": loss, "accuracy": accuracy}

  return train_step


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    averaging: TemporalAveraging = TemporalAveraging(), mesh: Mesh | None = None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """``train_step_fn`` jit-compiled, ``state`` donated. With a ``mesh``, the batch
  is split over its ``data`` axis and the state replicated: the gradient and the
  BatchNorm statistics are those of the global batch."""
  return _jit(train_step_fn(model, tx, averaging), mesh, donate_argnums=0)


def make_eval_step(model: nn.Module, mesh: Mesh | None = None) -> Callable[[TrainState, Batch], Metrics]:
  """``eval_step(state, batch) -> sums``, jit-compiled, BatchNorm in eval mode.

  ``batch`` holds ``x``, ``y`` and ``mask`` (float32 ``(B,)``, 0 for padding).
  Returns float32 scalars ``loss`` (sum of cross-entropy), ``correct`` and
  ``count``, so that metrics over many batches are exact ratios of sums.
  """

  def eval_step(state: TrainState, batch: Batch) -> Metrics:
    logits = model.apply(state.variables, batch["x"], train=False)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    mask = batch["mask"]
    return {"loss": jnp.sum(nll * mask),
            "correct": jnp.sum((jnp.argmax(logits, -1) == batch["y"]) * mask),
            "count": jnp.sum(mask)}

  return _jit(eval_step, mesh)


def evaluate(eval_step, state: TrainState, arrays: Mapping[str, np.ndarray], batch_size: int,
             perplexity: bool = False, averages: bool = True, mesh: Mesh | None = None
             ) -> dict[str, float]:
  """``loss`` (mean cross-entropy, nats), ``accuracy`` and, if asked, ``perplexity``
  = exp(loss), over every example of ``arrays`` once. With ``averages``, the same
  for each temporal average of the state, prefixed: ``ema_accuracy``, ``swa_loss``, ...
  With a ``mesh``, each process supplies its rows of every batch (``eval_step``
  made with the same mesh)."""
  batches = fjt_data.eval_batches(arrays, batch_size)
  if mesh is not None:
    rows = sharding.process_rows(batch_size, mesh)
    batches = (sharding.put_split({k: v[rows] for k, v in b.items()}, mesh, batch_size)
               for b in batches)
  sums = []
  for batch in batches:
    sums.append(eval_step(state, batch))
    if mesh is not None and sharding.needs_lockstep(mesh):
      jax.block_until_ready(sums[-1])
  totals = {k: float(np.sum([np.float64(s[k]) for s in sharding.to_host(sums)])) for k in sums[0]}
  metrics = {"loss": totals["loss"] / totals["count"], "accuracy": totals["correct"] / totals["count"]}
  if perplexity:
    metrics["perplexity"] = float(np.exp(metrics["loss"]))
  for name in ("ema", "swa") if averages else ():
    if name in state.averages and not (name == "swa" and int(state.averages["swa_count"]) == 0):
      averaged = state.replace(params=state.averages[name]["params"],
                               batch_stats=state.averages[name]["batch_stats"])
      for key, value in evaluate(eval_step, averaged, arrays, batch_size, perplexity, False,
                                 mesh).items():
        metrics[f"{name}_{key}"] = value
  return metrics


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


def _train_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  checkpoint = config.get("checkpoint") or {}
  return {
      "steps": require(config, "train.steps", positive_int, "a positive int"),
      "batch_size": require(config, "train.batch_size", positive_int, "a positive int"),
      "eval_every": require(config, "train.eval_every", positive_int, "a positive int"),
      "log_every": config.train.get("log_every", 50),
      "eval_batch_size": config.train.get("eval_batch_size", 1024),
      "seed": require(config, "seed", lambda v: isinstance(v, int), "an int"),
      "checkpoint_every": checkpoint.get("every_steps", 0) or config.train.steps,
      "max_to_keep": checkpoint.get("max_to_keep", 2),
      "best_metric": checkpoint.get("best_metric", ""),
      "best_mode": checkpoint.get("best_mode", "max"),
      "fallback": checkpoint.get("fallback", False),
  }


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


def _create_mesh(config, opts) -> Mesh:
  mesh = sharding.create_mesh(config.get("mesh") or None)
  if "data" not in mesh.shape:
    raise ConfigError(f"config key 'mesh': needs a 'data' axis, got {dict(mesh.shape)}")
  for key in ("batch_size", "eval_batch_size"):
    if opts[key] % mesh.shape["data"]:
      raise ConfigError(f"config key 'train.{key}': {opts[key]} does not split over the "
                        f"{mesh.shape['data']} devices of the 'data' axis; use a multiple of it")
  return mesh


def fit(config: ml_collections.ConfigDict, workdir: str,
        progress: bool = True) -> tuple[TrainState, dict[str, Any]]:
  """Trains the model of ``config`` and evaluates it; returns (final state, summary).

  Resumes from the newest complete checkpoint in ``WORKDIR/checkpoints`` if there
  is one (a finished run is only evaluated again). Data parallel over the mesh
  of ``config.mesh`` (default: every device on one ``data`` axis), across all the
  processes of a ``jax.distributed`` run; only process 0 writes files other than
  checkpoints. Writes to ``workdir``: ``config.json``, ``metrics.jsonl`` (one
  object per logged step: step, split, metrics), TensorBoard events,
  ``metrics.png``, checkpoints, and ``summary.json`` =
  ``{"step": final step, "eval": final eval metrics}``.
  """
  opts = _train_options(config)
  main = jax.process_index() == 0
  prepare_workdir(workdir)
  if main:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))
  dataset = fjt_data.load_dataset(config.data)
  if opts["batch_size"] > dataset.num_train:
    raise ConfigError(f"config key 'train.batch_size': {opts['batch_size']} is larger than the "
                      f"{dataset.num_train} training examples")
  language_model = dataset.info.get("task") == "language_model"
  mesh = _create_mesh(config, opts)

  model, tx, state = create_from_config(config, dataset.train["x"][:1])
  width = jax.eval_shape(lambda s: model.apply(s.variables, dataset.train["x"][:1], train=False),
                         state).shape[-1]
  if width != dataset.num_classes:
    key = "model.vocab_size" if language_model else "model.num_classes"
    raise ConfigError(f"config key {key!r}: the model outputs {width} classes but the data has "
                      f"{dataset.num_classes}")

  checkpointer = checkpoint.RunCheckpointer(workdir, opts["max_to_keep"], opts["best_metric"],
                                            opts["best_mode"])
  state, start = checkpointer.restore_latest(sharding.put_replicated(state, mesh),
                                             fallback=opts["fallback"])
  if start == 0:
    state = sharding.put_replicated(_fine_tune_start(config, workdir, state, tx, progress), mesh)

  averaging = TemporalAveraging.from_config(config)
  train_step, eval_step = make_train_step(model, tx, averaging, mesh), make_eval_step(model, mesh)
  run_eval = functools.partial(evaluate, eval_step, arrays=dataset.test,
                               batch_size=opts["eval_batch_size"], perplexity=language_model,
                               mesh=mesh)
  rows = sharding.process_rows(opts["batch_size"], mesh)
  lockstep = sharding.needs_lockstep(mesh)
  watchdog = (sharding.Watchdog(float((config.get("distributed") or {}).get("timeout_s", 60)))
              if jax.process_count() > 1 else None)
  writer = MetricWriter(workdir, start_step=start, enabled=main)
  window, window_start, tic = [], start, time.perf_counter()
  evaluated_at, eval_metrics = -1, {}
  steps = opts["steps"]
  try:
    with tqdm(total=steps, initial=start, disable=not (progress and main), desc="train",
              unit="step", dynamic_ncols=True) as bar:
      for step in range(start, steps):
        local = fjt_data.get_batch(dataset.train, opts["seed"], step, opts["batch_size"], rows)
        state, metrics = train_step(state, sharding.put_split(local, mesh, opts["batch_size"]))
        if lockstep:
          jax.block_until_ready(metrics)
        window.append(metrics)
        bar.update()
        done = step + 1
        save_now = done % opts["checkpoint_every"] == 0 or done == steps
        if done % opts["log_every"] == 0 or save_now:
          window = sharding.to_host(window)  # The only host sync of the training loop.
          _check_finite(window, window_start)  # Before a save: never checkpoint a NaN state.
          toc = time.perf_counter()
          logged = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
          logged["steps_per_sec"] = len(window) / (toc - tic)
          writer.write(done, "train", logged)
          bar.set_postfix(loss=f"{logged['loss']:.4f}", refresh=False)
          window, window_start, tic = [], done, toc
        if done % opts["eval_every"] == 0 or done == steps:
          eval_metrics, evaluated_at = run_eval(state), done
          writer.write(done, "eval", eval_metrics)
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
    writer.close()
    checkpointer.close()  # Waits for the last save; raises its errors.
    if watchdog:
      watchdog.stop()

  if language_model:
    eval_metrics["unigram_perplexity"] = dataset.info["unigram_perplexity"]
  summary = {"step": int(sharding.to_host(state.step)), "eval": eval_metrics}
  for name, path in (("pretrain", os.path.join(workdir, "pretrain", "summary.json")),
                     ("init_from", os.path.join(workdir, "init_from.json"))):
    if (info := _read_json(path)) is not None:
      summary[name] = info
  if main:
    with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2)
    baselines = {"unigram model": eval_metrics["unigram_perplexity"]} if language_model else None
    plot_metrics(writer.path, os.path.join(workdir, "metrics.png"),
                 "perplexity" if language_model else "accuracy", baselines)
  return state, summary


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains ``config`` and returns its summary: ``{"step": ..., "eval": {...}}``.

  A config with a ``replicas`` group trains N replicas in rounds (``fjt.replicas.fit``);
  any other is one model, data parallel over the devices (``fit``).
  """
  if config.get("replicas"):
    from fjt import replicas  # Imported on demand: most runs have no replicas.
    return replicas.fit(config, workdir)[1]
  return fit(config, workdir)[1]
