"""N replicas trained together: local steps on their own data, then aggregation (FedAvg).

The N replicas are one pytree: a ``TrainState`` whose every leaf has a leading replica axis
(replica ``r`` is ``jax.tree.map(lambda x: x[r], replicas)``), all starting from the same init.
A round is one jit-compiled function::

  vmap over replicas (scan over local steps (train step))  ->  aggregate  ->  broadcast

with the example counts ``n_k`` of the replicas' shards as weights: ``params`` by the weighted
mean (optionally through a server optimizer), ``batch_stats`` by the exact pooled mean and
variance of ``fjt.aggregate.merge_batch_stats``. On several devices the replica axis is sharded
over mesh axis ``"replica"``: each device trains its replicas, and the aggregation is a
cross-device reduction that XLA inserts.

Optimizer state: each replica keeps its own (momentum, Adam moments, schedule count) across
rounds, as DiLoCo does; ``optimizer_state="average"`` replaces them with their weighted mean at
every round. A fresh state per round is not offered: the learning-rate schedule counts its steps
in the optimizer state, so a reset would restart the schedule each round.

Server optimizer (FedOpt, Reddi et al., 2021): the pseudo-gradient of a round is
``g = w - sum_k n_k w_k / sum_k n_k`` (``w``: the global params at the start of the round) and
the new global params are ``w + server_tx.update(g)``: ``"none"`` is ``w - lr * g`` (lr 1: the
weighted mean itself, plain FedAvg), ``"momentum"`` is FedAvgM (SGD with momentum on ``g``),
``"nesterov"`` is DiLoCo's outer optimizer (Nesterov SGD on ``g``).
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from fjt import checkpoint
from fjt import data as fjt_data
from fjt import train as fjt_train
from fjt.averaging import TemporalAveraging
from fjt.config import ConfigError, positive_int, require
from fjt.data import splits as fjt_splits
from fjt.logs import MetricWriter, plot_metrics
from fjt.sharding import create_mesh, process_rows, put_global, put_replicated, to_host
from fjt.state import PyTree, TrainState, create_from_config
from fjt.train import train_step_fn

AXIS = "replica"
SPLITS = ("iid", "dirichlet")
SERVER_OPTIMIZERS = ("none", "momentum", "nesterov")
OPTIMIZER_STATES = ("keep", "average")
_NO_AVERAGES = ("config keys 'ema.decay' and 'swa.every': temporal averages are not kept by "
                "replicas; set both to 0")

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class ReplicaState:
  """Everything a federated run carries from round to round.

  Attributes:
    replicas: a ``TrainState`` whose every leaf has a leading axis of size N, one row per
      replica. After each round ``params`` and ``batch_stats`` are equal in every row.
    server_opt_state: the server optimizer's state over ``params`` (no replica axis);
      ``()`` for plain FedAvg.
  """
  replicas: TrainState
  server_opt_state: PyTree = ()

  @property
  def num_replicas(self) -> int:
    return int(self.replicas.step.shape[0])


# ---------------------------------------------------------------------------------------------
# One replica's step, and aggregation over the replica axis (both traceable, used inside jit).


def local_step(model: nn.Module, tx: optax.GradientTransformation, state: TrainState,
               batch: Batch) -> tuple[TrainState, Metrics]:
  """One optimizer step of one replica on ``batch`` (``x``, int32 ``y`` ``(B,)``), un-jitted:
  ``fjt.train.train_step_fn`` (replicas keep no temporal averages)."""
  return train_step_fn(model, tx)(state, batch)


def _per_replica(counts: jax.Array, x: jax.Array) -> jax.Array:
  """``counts`` ``(N,)`` shaped to broadcast against ``x`` ``(N, ...)``."""
  return counts.reshape((-1,) + (1,) * (x.ndim - 1))


def replica_mean(tree: PyTree, counts: jax.Array) -> PyTree:
  """Weighted mean over the leading replica axis: ``sum_k n_k x_k / sum_k n_k`` per leaf.

  ``tree``'s leaves are ``(N, ...)``; ``counts`` is ``(N,)`` (e.g. example counts). Floating
  leaves are accumulated in at least float32 and cast back; integer leaves (step counters) take
  the maximum over replicas. The result has no replica axis. Traceable; over a sharded replica
  axis the sums are all-reduces.
  """
  def mean(x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return jnp.max(x, axis=0)
    acc = jnp.promote_types(x.dtype, jnp.float32)
    n = counts.astype(acc)
    return (jnp.sum(_per_replica(n, x) * x.astype(acc), axis=0) / jnp.sum(n)).astype(x.dtype)

  return jax.tree.map(mean, tree)


def replica_batch_stats(stats: PyTree, counts: jax.Array, path: str = "batch_stats") -> PyTree:
  """BatchNorm statistics of N replicas ``(N, features)`` merged into those of the union of their
  data: per module, with ``n = sum_k n_k``::

    mean = sum_k n_k * mean_k / n,   var = sum_k n_k * (var_k + (mean_k - mean)^2) / n

  The formula of ``fjt.aggregate.merge_batch_stats`` on a stacked axis, traceable. Every leaf
  must be the ``mean`` or ``var`` of a module; the error names ``path`` otherwise.
  """
  if isinstance(stats, Mapping) and set(stats) == {"mean", "var"} and \
      not isinstance(stats["mean"], Mapping):
    acc = jnp.promote_types(stats["mean"].dtype, jnp.float32)
    means, variances = stats["mean"].astype(acc), stats["var"].astype(acc)
    n = _per_replica(counts.astype(acc), means)
    total = jnp.sum(counts.astype(acc))
    mean = jnp.sum(n * means, axis=0) / total
    var = jnp.sum(n * (variances + jnp.square(means - mean)), axis=0) / total
    return type(stats)({"mean": mean.astype(stats["mean"].dtype),
                        "var": var.astype(stats["var"].dtype)})
  if isinstance(stats, Mapping):
    return type(stats)({k: replica_batch_stats(v, counts, f"{path}/{k}") for k, v in stats.items()})
  raise ValueError(f"{path} is not a BatchNorm statistic: batch_stats leaves are 'mean' and "
                   "'var', one pair per BatchNorm module")


def _broadcast(tree: PyTree, num: int) -> PyTree:
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (num, *x.shape)), tree)


# ---------------------------------------------------------------------------------------------
# Replicas: creation, placement on devices, rounds.


def create_server_optimizer(name: str = "none", learning_rate: float = 1.0,
                            momentum: float = 0.0) -> optax.GradientTransformation | None:
  """The optimizer applied to the pseudo-gradient; None for plain FedAvg ("none", lr 1).

  ``"none"``: ``optax.sgd(lr)``; ``"momentum"``: ``optax.sgd(lr, momentum)`` (FedAvgM);
  ``"nesterov"``: ``optax.sgd(lr, momentum, nesterov=True)`` (DiLoCo's outer step).
  """
  if name not in SERVER_OPTIMIZERS:
    raise ConfigError(f"config key 'replicas.server_optimizer': expected one of "
                      f"{SERVER_OPTIMIZERS}, got {name!r}")
  if not learning_rate > 0:
    raise ConfigError("config key 'replicas.server_learning_rate': expected a positive number, "
                      f"got {learning_rate!r}")
  if name == "none":
    return None if learning_rate == 1.0 else optax.sgd(learning_rate)
  if not 0 <= momentum < 1:
    raise ConfigError("config key 'replicas.server_momentum': expected 0 <= momentum < 1, got "
                      f"{momentum!r}")
  return optax.sgd(learning_rate, momentum=momentum or None, nesterov=name == "nesterov")


def replicate(state: TrainState, num_replicas: int,
              server_tx: optax.GradientTransformation | None = None) -> ReplicaState:
  """``num_replicas`` copies of ``state`` stacked on a leading axis, and the server's state.

  Every replica starts from the same params, batch statistics and optimizer state; replica
  ``r``'s rng is ``fold_in(state.rng, r)``, so their dropout masks differ.
  """
  if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
    raise ConfigError(f"config key 'replicas.num': expected a positive int, got {num_replicas!r}")
  if jax.tree.leaves(state.averages):
    raise ConfigError(_NO_AVERAGES)
  replicas = _broadcast(state, num_replicas).replace(
      rng=jax.vmap(lambda r: jax.random.fold_in(state.rng, r))(jnp.arange(num_replicas)))
  return ReplicaState(replicas, server_tx.init(state.params) if server_tx else ())


def global_state(state: ReplicaState, mesh: Mesh | None = None) -> TrainState:
  """The aggregated model as a ``TrainState``: after a round every replica holds the aggregate's
  params and batch statistics; step, optimizer state and rng are replica 0's. With ``mesh``,
  replicated over it (every process of a multi-process run holds it)."""
  take = lambda replicas: jax.tree.map(lambda x: x[0], replicas)
  if mesh is None:
    return take(state.replicas)
  return jax.jit(take, out_shardings=NamedSharding(mesh, P()))(state.replicas)


def replica_mesh(num_replicas: int, devices=None) -> Mesh:
  """A mesh of ``devices`` (default: all) on one axis ``"replica"``; each device gets
  ``num_replicas / len(devices)`` replicas, which must be a whole number."""
  devices = list(jax.devices() if devices is None else devices)
  if num_replicas % len(devices):
    raise ConfigError(f"config key 'replicas.num': {num_replicas} replicas do not split evenly "
                      f"over the {len(devices)} devices of mesh axis {AXIS!r}; use a multiple of "
                      f"{len(devices)}")
  return create_mesh({AXIS: -1}, devices)


def shard_replicas(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places a tree whose leaves have a leading replica axis with that axis split over ``mesh``."""
  parts = mesh.shape[AXIS]
  for x in jax.tree.leaves(tree):
    if np.shape(x)[0] % parts:
      raise ConfigError(f"config key 'replicas.num': {np.shape(x)[0]} replicas do not split "
                        f"evenly over the {parts} devices of mesh axis {AXIS!r}; use a multiple "
                        f"of {parts}")
  return put_global(tree, NamedSharding(mesh, P(AXIS)))  # Each process keeps its replicas.


def local_replicas(num_replicas: int, mesh: Mesh) -> range:
  """The replicas this process trains: one contiguous block of the replica axis (devices are
  in process order)."""
  rows = process_rows(num_replicas, mesh, AXIS)
  return range(rows.start, rows.stop)


def put_local_replicas(local: PyTree, mesh: Mesh, num_replicas: int) -> PyTree:
  """This process's rows (``local_replicas``) of a replica-stacked tree as global arrays."""
  sharding = NamedSharding(mesh, P(AXIS))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
      sharding, x, (num_replicas, *x.shape[1:])), local)


def shard_state(state: ReplicaState, mesh: Mesh) -> ReplicaState:
  """``state`` on ``mesh``: the replicas split over axis ``"replica"``, the server's state
  replicated."""
  return ReplicaState(shard_replicas(state.replicas, mesh),
                      put_replicated(state.server_opt_state, mesh))


def make_round(model: nn.Module, tx: optax.GradientTransformation,
               server_tx: optax.GradientTransformation | None = None, mesh: Mesh | None = None,
               optimizer_state: str = "keep"
               ) -> Callable[[ReplicaState, Batch, jax.Array], tuple[ReplicaState, Metrics]]:
  """``run_round(state, batches, counts) -> (state, metrics)``, jit-compiled, ``state`` donated.

  ``batches`` holds ``x`` ``(N, L, B, ...)`` and int32 ``y`` ``(N, L, B)``: replica ``k`` takes
  ``L`` local steps (``local_step``), step ``t`` on ``batches[k, t]``. Then, with ``counts``
  ``(N,)`` the weights ``n_k``: params ``w <- w + server_tx.update(w - replica_mean(w_k))``
  (the weighted mean itself when ``server_tx`` is None), ``batch_stats`` merged by
  ``replica_batch_stats``, optimizer states kept per replica (``"keep"``) or replaced by their
  ``replica_mean`` (``"average"``); the aggregate is broadcast to every replica. Metrics:
  ``loss`` and ``accuracy`` ``(N, L)``. With ``mesh``, inputs and outputs are split over its
  ``"replica"`` axis (the server's state replicated).
  """
  if optimizer_state not in OPTIMIZER_STATES:
    raise ConfigError(f"config key 'replicas.optimizer_state': expected one of "
                      f"{OPTIMIZER_STATES}, got {optimizer_state!r}")

  def run_round(state: ReplicaState, batches: Batch, counts: jax.Array
                ) -> tuple[ReplicaState, Metrics]:
    start = state.replicas
    num = state.num_replicas
    n = jnp.asarray(counts, jnp.float32)
    train_replica = lambda s, b: jax.lax.scan(functools.partial(local_step, model, tx), s, b)
    trained, metrics = jax.vmap(train_replica)(start, batches)
    server_opt_state = state.server_opt_state
    if server_tx is None:
      params = _broadcast(replica_mean(trained.params, n), num)
    else:
      # Rows of start.params are all the global params w, so w - mean_k(w_k) = mean_k(w - w_k),
      # and w + update stays equal in every row without gathering w from one device.
      pseudo_grad = replica_mean(jax.tree.map(jnp.subtract, start.params, trained.params), n)
      updates, server_opt_state = server_tx.update(pseudo_grad, server_opt_state)
      params = jax.tree.map(lambda w, u: (w + u).astype(w.dtype), start.params, updates)
    opt_state = trained.opt_state
    if optimizer_state == "average":
      opt_state = _broadcast(replica_mean(opt_state, n), num)
    batch_stats = _broadcast(replica_batch_stats(trained.batch_stats, n), num)
    replicas = trained.replace(params=params, batch_stats=batch_stats, opt_state=opt_state)
    return ReplicaState(replicas, server_opt_state), metrics

  if mesh is None:
    return jax.jit(run_round, donate_argnums=0)
  split, whole = NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, P())
  shardings = ReplicaState(split, whole)
  return jax.jit(run_round, donate_argnums=0, in_shardings=(shardings, split, split),
                 out_shardings=(shardings, split))


# ---------------------------------------------------------------------------------------------
# The driver.


def _options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  replicas = config.get("replicas")
  if not isinstance(replicas, ml_collections.ConfigDict):
    raise ConfigError("config has no group 'replicas', which fjt.replicas.fit requires")
  opts = {
      "num": require(config, "replicas.num", positive_int, "a positive int"),
      "split": require(config, "replicas.split", lambda v: v in SPLITS, f"one of {SPLITS}"),
      "local_steps": require(config, "replicas.local_steps", positive_int, "a positive int"),
      "rounds": require(config, "replicas.rounds", positive_int, "a positive int"),
      "seed": require(config, "replicas.seed", lambda v: isinstance(v, int), "an int"),
      "alpha": float(replicas.get("alpha", 0.5)),
      "min_size": int(replicas.get("min_size", 1)),
      "server_optimizer": replicas.get("server_optimizer", "none"),
      "server_learning_rate": float(replicas.get("server_learning_rate", 1.0)),
      "server_momentum": float(replicas.get("server_momentum", 0.0)),
      "optimizer_state": replicas.get("optimizer_state", "keep"),
      "batch_size": require(config, "train.batch_size", positive_int, "a positive int"),
      "eval_batch_size": config.train.get("eval_batch_size", 1024),
      "seed_train": require(config, "seed", lambda v: isinstance(v, int), "an int"),
  }
  for key in ("pretrain", "init_from"):
    if config.get(key):
      raise ConfigError(f"config key {key!r}: fjt.replicas.fit does not start from a checkpoint "
                        "yet; leave it empty")
  return opts


def _with_steps(config: ml_collections.ConfigDict, steps: int) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  config.train.steps = steps
  return config


def centralized_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The centralised baseline of a replicas config, for ``fjt.train.fit``: the same model,
  optimizer and seed on the whole training set, seeing the same number of examples: batch size
  ``N * B`` for ``rounds * local_steps`` steps, evaluated every ``local_steps`` steps (once per
  round-equivalent) and checkpointed at the end only."""
  opts = _options(config)
  steps = opts["rounds"] * opts["local_steps"]
  central = _with_steps(config, steps)
  del central["replicas"]
  central.train.batch_size = opts["num"] * opts["batch_size"]
  central.train.eval_every = central.train.log_every = opts["local_steps"]
  if central.get("checkpoint") is not None:
    central.checkpoint.every_steps = steps
  return central


def _check_finite(loss: np.ndarray, round_: int) -> None:
  """Raises ``NonFiniteLossError`` naming the first replica and local step whose loss
  (``(N, L)``) is NaN or infinite."""
  bad = np.argwhere(~np.isfinite(loss))
  if len(bad):
    k, t = bad[0]
    raise fjt_train.NonFiniteLossError(
        f"training loss of replica {k} is {loss[k, t]} at local step {t + 1} of round {round_}; "
        "lower optimizer.learning_rate or set optimizer.grad_clip_norm")


def _check_centralized_dir(directory: str, config: ml_collections.ConfigDict) -> None:
  """``fjt.train.fit`` resumes (or only re-evaluates) a run it finds in its workdir: refuse a
  baseline left there by a different config rather than report its stale accuracy."""
  try:
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
      saved = f.read()
  except OSError:
    return
  if saved != config.to_json_best_effort(indent=2):
    raise ConfigError(f"{directory} holds a centralised baseline of a different config; use a new "
                      "workdir, or delete that directory to train the baseline again")


def split_dataset(labels: np.ndarray, opts: Mapping[str, Any]) -> list[np.ndarray]:
  """The shards of ``opts["split"]`` (``iid`` or ``dirichlet``) as index arrays."""
  try:
    if opts["split"] == "iid":
      return fjt_splits.iid_split(labels, opts["num"], opts["seed"])
    return fjt_splits.dirichlet_split(labels, opts["num"], opts["alpha"], opts["seed"],
                                      opts["min_size"])
  except ValueError as e:  # The split functions name the 'replicas.*' key.
    raise ConfigError(str(e)) from e


def fit(config: ml_collections.ConfigDict, workdir: str,
        progress: bool = True) -> tuple[TrainState, dict[str, Any]]:
  """Trains ``config.replicas.num`` replicas for ``rounds`` rounds and evaluates the aggregate;
  returns (global state, summary).

  ``config.replicas``: ``num``, ``split`` (``iid`` | ``dirichlet``), ``alpha`` and ``min_size``
  (dirichlet), ``seed`` (of the split), ``local_steps``, ``rounds``, ``server_optimizer``,
  ``server_learning_rate``, ``server_momentum``, ``optimizer_state``. ``train.batch_size`` is
  each replica's batch size B; ``train.steps`` is set to ``rounds * local_steps`` (each
  replica's optimizer steps, which the learning-rate schedule spans). Replica ``k``'s batches
  are ``fjt.data.splits.replica_batches`` of its shard with seed ``config.seed``.

  Writes to ``workdir``: ``config.json``, ``splits.json`` (examples and examples per class of
  each replica), ``metrics.jsonl`` (per round: ``train`` loss/accuracy averaged over replicas and
  local steps, ``eval`` of the aggregate on the test split), ``metrics.png``, the final global
  state in ``final/``, the centralised baseline run (``centralized_config``) in
  ``centralized/``, and ``summary.json`` = ``{"step": rounds, "eval": {"accuracy", "loss",
  "centralized_accuracy", "centralized_loss"}, "replicas": {...}, "seconds": {...}}``.
  """
  opts = _options(config)
  rounds, local_steps, num = opts["rounds"], opts["local_steps"], opts["num"]
  config = _with_steps(config, rounds * local_steps)
  if TemporalAveraging.from_config(config).names:
    raise ConfigError(_NO_AVERAGES)
  central_config, central_dir = centralized_config(config), os.path.join(workdir, "centralized")
  _check_centralized_dir(central_dir, central_config)
  main = jax.process_index() == 0  # Only process 0 writes files other than checkpoints.
  fjt_train.prepare_workdir(workdir)
  if main:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))
  dataset = fjt_data.load_dataset(config.data)
  if dataset.info.get("task") == "language_model":
    raise ConfigError("config key 'data.name': replicas train classifiers; "
                      f"{config.data.name!r} is a language-model dataset")

  shards = split_dataset(dataset.train["y"], opts)
  counts = [len(s) for s in shards]
  class_counts = fjt_splits.split_counts(shards, dataset.train["y"], dataset.num_classes)
  report = {"num": num, "split": opts["split"], "seed": opts["seed"], "counts": counts,
            "class_counts": class_counts.tolist()}
  if opts["split"] == "dirichlet":
    report.update(alpha=opts["alpha"], min_size=opts["min_size"])
  if main:
    with open(os.path.join(workdir, "splits.json"), "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)

  tic = time.perf_counter()
  mesh = replica_mesh(num)
  model, tx, state = create_from_config(config, dataset.train["x"][:1])
  server_tx = create_server_optimizer(opts["server_optimizer"], opts["server_learning_rate"],
                                     opts["server_momentum"])
  state = shard_state(replicate(state, num, server_tx), mesh)
  run_round = make_round(model, tx, server_tx, mesh, opts["optimizer_state"])
  data_mesh = Mesh(mesh.devices, ("data",))  # Evaluation splits test batches over the devices.
  eval_step = fjt_train.make_eval_step(model, data_mesh)
  eval_batch_size = -(-opts["eval_batch_size"] // mesh.size) * mesh.size
  weights = shard_replicas(np.asarray(counts, np.float32), mesh)
  mine = local_replicas(num, mesh)
  gather = jax.jit(lambda tree: tree, out_shardings=NamedSharding(mesh, P()))
  writer = MetricWriter(workdir, enabled=main)
  try:
    with tqdm(total=rounds, disable=not (progress and main), desc="rounds", unit="round",
              dynamic_ncols=True) as bar:
      for r in range(rounds):
        # Each process builds only the batches of its own replicas.
        batches = fjt_splits.replica_batches(dataset.train, [shards[k] for k in mine],
                                             opts["seed_train"], r * local_steps, local_steps,
                                             opts["batch_size"], first_replica=mine.start)
        state, metrics = run_round(state, put_local_replicas(batches, mesh, num), weights)
        metrics = to_host(gather(metrics))
        _check_finite(metrics["loss"], r + 1)
        writer.write(r + 1, "train", {k: float(np.mean(v)) for k, v in metrics.items()})
        eval_metrics = fjt_train.evaluate(eval_step, global_state(state, mesh), dataset.test,
                                          eval_batch_size, averages=False, mesh=data_mesh)
        writer.write(r + 1, "eval", eval_metrics)
        bar.set_postfix(accuracy=f"{eval_metrics['accuracy']:.4f}", refresh=False)
        bar.update()
  finally:
    writer.close()
  final = global_state(state, mesh)
  checkpoint.save(os.path.join(workdir, "final"), final, force=True)
  replicas_seconds = time.perf_counter() - tic

  tic = time.perf_counter()
  _, central = fjt_train.fit(central_config, central_dir, progress=progress)
  central_seconds = time.perf_counter() - tic

  summary = {
      "step": rounds,
      "eval": {**eval_metrics, "centralized_accuracy": central["eval"]["accuracy"],
               "centralized_loss": central["eval"]["loss"]},
      "replicas": {**report, "local_steps": local_steps, "rounds": rounds,
                   "batch_size": opts["batch_size"],
                   "server_optimizer": opts["server_optimizer"],
                   "server_learning_rate": opts["server_learning_rate"],
                   "server_momentum": opts["server_momentum"],
                   "optimizer_state": opts["optimizer_state"]},
      "seconds": {"replicas": replicas_seconds, "centralized": central_seconds},
  }
  if main:
    with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2)
    plot_metrics(writer.path, os.path.join(workdir, "metrics.png"), "accuracy",
                 {"centralized": central["eval"]["accuracy"]})
  return final, summary
