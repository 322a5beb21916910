"""N replicas trained together: local steps on their own data, then aggregation (FedAvg).

The N replicas are one pytree: a ``TrainState`` whose every leaf has a leading replica axis
(replica ``r`` is ``jax.tree.map(lambda x: x[r], replicas)``), all starting from the same init.
A round is one jit-compiled function::

  vmap over replicas (scan over local steps (train step))  ->  aggregate  ->  broadcast

with the example counts ``n_k`` of the replicas' shards as weights: ``params`` by the weighted
mean (optionally through a server optimizer), ``batch_stats`` by the exact pooled mean and
variance of ``fjt.aggregate.merge_batch_stats``. On several devices the replica axis is sharded
over mesh axis ``"replica"`` (and, with ``mesh.fsdp > 1``, each replica's state over an
``"fsdp"`` axis of its group of devices): each device trains its replicas, and the aggregation is a
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

Communication (DiLoCo, Douillard et al., 2023; OpenDiLoCo): with ``communication_dtype``
``bfloat16`` each replica's pseudo-gradient ``w - w_k`` is cast to bfloat16 before the mean (what
would cross the network), the mean accumulated in float32. ``communication_bytes`` counts what a
replica sends per round, against what synchronous data parallel sends (a float32 gradient per
step).
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
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

from fjt import checkpoint, distributed, runs, sharding
from fjt import data as fjt_data
from fjt import train as fjt_train
from fjt.averaging import TemporalAveraging
from fjt.config import ConfigError, with_run_defaults
from fjt.data import Dataset
from fjt.data import splits as fjt_splits
from fjt.logs import RunLog
from fjt.models import create_model
from fjt.optim import check_optimizer_config
from fjt.options import ReplicaOptions, ShardingOptions, TrainOptions, check_model_widths
from fjt.sharding import (FSDP, Rules, create_mesh, logical_shardings, needs_lockstep,
                          process_rows, put_global, put_like, put_replicated, put_split, to_host)
from fjt.state import PyTree, TrainState, boxed_abstract_state, create_from_config
from fjt.steps import TaskLike, evaluate, make_eval_step, make_train_step, train_step_fn
from fjt.train import NonFiniteLossError

AXIS = "replica"
SERVER_OPTIMIZERS = ("none", "momentum", "nesterov")
OPTIMIZER_STATES = ("keep", "average")
COMMUNICATION_DTYPES = ("float32", "bfloat16")
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
               batch: Batch, task: TaskLike = "classification",
               rng_streams: Sequence[str] = ("dropout",)) -> tuple[TrainState, Metrics]:
  """One optimizer step of one replica on ``batch``, un-jitted: ``fjt.steps.train_step_fn``
  with ``task`` (replicas keep no temporal averages)."""
  return train_step_fn(model, tx, task, rng_streams=rng_streams)(state, batch)


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


def global_state(state: ReplicaState, mesh: Mesh | None = None, layout: TrainState | None = None
                 ) -> TrainState:
  """The aggregated model as a ``TrainState``: after a round every replica holds the aggregate's
  params and batch statistics; step, optimizer state and rng are replica 0's. With ``mesh``,
  replicated over it (every process of a multi-process run holds it), or laid out by ``layout``
  (a ``TrainState`` of shardings: one state split over ``fsdp``)."""
  take = lambda replicas: jax.tree.map(lambda x: x[0], replicas)
  if mesh is None:
    return take(state.replicas)
  out = NamedSharding(mesh, P()) if layout is None else layout
  return jax.jit(take, out_shardings=out)(state.replicas)


def replica_mesh(num_replicas: int, devices=None, fsdp: int = 1) -> Mesh:
  """A mesh of ``devices`` (default: all) on one axis ``"replica"``; each device gets
  ``num_replicas / len(devices)`` replicas, which must be a whole number. With ``fsdp > 1``
  (config key ``mesh.fsdp``), a second axis ``"fsdp"`` of that size: ``len(devices) / fsdp``
  groups of ``fsdp`` devices, each group's replicas' states split over its devices."""
  devices = list(jax.devices() if devices is None else devices)
  if fsdp < 1 or len(devices) % fsdp:
    raise ConfigError(f"config key 'mesh.fsdp': {fsdp} does not divide the {len(devices)} devices")
  groups = len(devices) // fsdp
  if num_replicas % groups:
    raise ConfigError(f"config key 'replicas.num': {num_replicas} replicas do not split evenly "
                      f"over the {groups} devices of mesh axis {AXIS!r}; use a multiple of "
                      f"{groups}")
  return create_mesh({AXIS: -1} if fsdp == 1 else {AXIS: -1, FSDP: fsdp}, devices)


def replica_shardings(one: TrainState, server: PyTree, mesh: Mesh) -> ReplicaState:
  """The layout of a ``ReplicaState`` on a ``replica_mesh`` with an ``fsdp`` axis: replica
  ``k``'s leaves as ``one`` (a ``TrainState`` of ``NamedSharding``s on ``mesh``,
  ``fjt.state.state_shardings``) lays out one state, the replica axis over ``"replica"``; the
  server's optimizer state as ``server`` (shardings, ``()`` without a server optimizer)."""
  return ReplicaState(jax.tree.map(lambda s: NamedSharding(mesh, P(AXIS, *s.spec)), one), server)


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


def shard_state(state: ReplicaState, mesh: Mesh, layout: ReplicaState | None = None
                ) -> ReplicaState:
  """``state`` on ``mesh``: the replicas split over axis ``"replica"``, the server's state
  replicated; or laid out by ``layout`` (``replica_shardings``)."""
  if layout is not None:
    return put_like(state, layout)
  return ReplicaState(shard_replicas(state.replicas, mesh),
                      put_replicated(state.server_opt_state, mesh))


def sharded_layout(model: nn.Module, tx: optax.GradientTransformation,
                   server_tx: optax.GradientTransformation | None, example_x: PyTree, mesh: Mesh,
                   rules: Rules, rng_streams: Sequence[str] = ("dropout",)
                   ) -> tuple[TrainState, ReplicaState]:
  """``(one, layout)``: the shardings of one replica's state on ``mesh`` (split over its
  ``fsdp`` axis by the logical-axis ``rules``) and of the whole ``ReplicaState``
  (``replica_shardings``); the server's optimizer state is laid out as the params it mirrors."""
  boxed = boxed_abstract_state(model, tx, example_x, rng_streams=rng_streams)
  one = logical_shardings(boxed, mesh, rules)
  server = (logical_shardings(jax.eval_shape(server_tx.init, boxed.params), mesh, rules)
            if server_tx is not None else ())
  return one, replica_shardings(one, server, mesh)


def make_round(model: nn.Module, tx: optax.GradientTransformation,
               server_tx: optax.GradientTransformation | None = None, mesh: Mesh | None = None,
               optimizer_state: str = "keep", task: TaskLike = "classification",
               rng_streams: Sequence[str] = ("dropout",), communication_dtype: str = "float32",
               layout: ReplicaState | None = None
               ) -> Callable[[ReplicaState, Batch, jax.Array], tuple[ReplicaState, Metrics]]:
  """``run_round(state, batches, counts) -> (state, metrics)``, jit-compiled, ``state`` donated.

  ``batches`` holds ``x`` ``(N, L, B, ...)`` and ``y`` ``(N, L, B, ...)``: replica ``k`` takes
  ``L`` local steps (``local_step`` with ``task``), step ``t`` on ``batches[k, t]``. Then, with ``counts``
  ``(N,)`` the weights ``n_k``: params ``w <- w + server_tx.update(w - replica_mean(w_k))``
  (the weighted mean itself when ``server_tx`` is None), ``batch_stats`` merged by
  ``replica_batch_stats``, optimizer states kept per replica (``"keep"``) or replaced by their
  ``replica_mean`` (``"average"``); the aggregate is broadcast to every replica. With
  ``communication_dtype="bfloat16"`` the pseudo-gradients ``w - w_k`` are averaged as bfloat16
  values (float32 sums). Metrics: the train step's (``loss``, ...), each ``(N, L)``. With ``mesh``, inputs and outputs are split over its
  ``"replica"`` axis (the server's state replicated), the state as ``layout`` says if given
  (``replica_shardings``: each replica's state split over ``fsdp`` too).
  """
  if optimizer_state not in OPTIMIZER_STATES:
    raise ConfigError(f"config key 'replicas.optimizer_state': expected one of "
                      f"{OPTIMIZER_STATES}, got {optimizer_state!r}")
  if communication_dtype not in COMMUNICATION_DTYPES:
    raise ConfigError(f"config key 'replicas.communication_dtype': expected one of "
                      f"{COMMUNICATION_DTYPES}, got {communication_dtype!r}")
  wire = jnp.dtype(communication_dtype)

  def run_round(state: ReplicaState, batches: Batch, counts: jax.Array
                ) -> tuple[ReplicaState, Metrics]:
    start = state.replicas
    num = state.num_replicas
    n = jnp.asarray(counts, jnp.float32)
    step = functools.partial(local_step, model, tx, task=task, rng_streams=rng_streams)
    train_replica = lambda s, b: jax.lax.scan(step, s, b)
    trained, metrics = jax.vmap(train_replica)(start, batches)
    server_opt_state = state.server_opt_state
    if server_tx is None and wire == jnp.float32:
      params = _broadcast(replica_mean(trained.params, n), num)
    else:
      # Rows of start.params are all the global params w, so w - mean_k(w_k) = mean_k(w - w_k),
      # and w + update stays equal in every row without gathering w from one device.
      sent = jax.tree.map(lambda w, w_k: (w - w_k).astype(wire), start.params, trained.params)
      pseudo_grad = jax.tree.map(lambda g, w: g.astype(w.dtype), replica_mean(sent, n),
                                 start.params)
      if server_tx is None:  # Plain FedAvg: w - mean_k(w - w_k).
        updates = jax.tree.map(jnp.negative, pseudo_grad)
      else:
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
  shardings = ReplicaState(split, whole) if layout is None else layout
  return jax.jit(run_round, donate_argnums=0, in_shardings=(shardings, split, split),
                 out_shardings=(shardings, split))


# ---------------------------------------------------------------------------------------------
# The driver.


def _with_steps(config: ml_collections.ConfigDict, steps: int) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  config.train.steps = steps
  return config


def baseline_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """A baseline of a replicas config, for ``fjt.train.fit``: the same model, optimizer and seed
  for as many optimizer steps as each replica takes (``warmup_steps + rounds * local_steps``),
  evaluated every ``local_steps`` steps and checkpointed at the end only. ``"centralized"`` or
  ``"sync"``: synchronous data parallel on the whole training set with the global batch
  ``N * B`` (the same examples seen); ``"single"``: one worker with the per-replica batch B."""
  opts = ReplicaOptions.from_config(config)
  steps = opts.inner_steps
  baseline = _with_steps(config, steps)
  del baseline["replicas"]
  baseline.train.batch_size = config.train.batch_size * (1 if name == "single" else opts.num)
  baseline.train.eval_every = baseline.train.log_every = opts.local_steps
  baseline.checkpoint.every_steps = steps
  return baseline


def centralized_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``baseline_config(config, "centralized")``: batch ``N * B``, every replica's steps."""
  return baseline_config(config, "centralized")


def communication_bytes(params: PyTree, opts: ReplicaOptions) -> dict[str, Any]:
  """What one replica sends: a pseudo-gradient (``opts.communication_dtype``) per round, against
  synchronous data parallel's gradient (the params' dtype) per step, for the same inner steps
  after the warm start (``ratio``); and with the warm start counted on both sides (its
  ``warmup_steps`` are synchronous data parallel: a gradient per step), ``ratio_with_warmup``."""
  leaves = jax.tree.leaves(params)
  size = sum(int(np.prod(np.shape(x))) for x in leaves)
  gradient_bytes = sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in leaves)
  sent = opts.rounds * size * np.dtype(jnp.dtype(opts.communication_dtype)).itemsize
  sync = opts.rounds * opts.local_steps * gradient_bytes
  warmup = opts.warmup_steps * gradient_bytes
  return {"rounds": opts.rounds, "dtype": opts.communication_dtype,
          "bytes_per_replica": sent, "sync_bytes_per_replica": sync,
          "ratio": sync / sent, "warmup_bytes_per_replica": warmup,
          "ratio_with_warmup": (warmup + sync) / (warmup + sent)}


def _check_finite(loss: np.ndarray, round_: int) -> None:
  """Raises ``NonFiniteLossError`` naming the first replica and local step whose loss
  (``(N, L)``) is NaN or infinite."""
  bad = np.argwhere(~np.isfinite(loss))
  if len(bad):
    k, t = bad[0]
    raise NonFiniteLossError(
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


def split_dataset(dataset: Dataset, opts: ReplicaOptions) -> list[np.ndarray]:
  """The shards of ``opts.split`` of ``dataset``'s training examples as index arrays:
  ``iid``; ``dirichlet`` by the int labels ``train["y"]``; ``by_source`` by
  ``dataset.sources`` (whole sources per replica, ``fjt.data.splits.source_split``)."""
  try:
    if opts.split == "iid":
      return fjt_splits.iid_split(dataset.train["y"], opts.num, opts.seed)
    if opts.split == "by_source":
      if dataset.sources is None:
        raise ValueError("config key 'replicas.split': 'by_source' needs a dataset that records "
                         "each training example's source (Dataset.sources: the 'text' and "
                         "'text_files' datasets do); this one does not: use 'iid'")
      return fjt_splits.source_split(dataset.sources.ids, opts.num)
    targets = np.asarray(dataset.train["y"])
    if targets.ndim != 1 or not np.issubdtype(targets.dtype, np.integer):
      raise ValueError(f"config key 'replicas.split': 'dirichlet' splits by class labels, one int "
                       f"per example; these targets are {targets.dtype} {targets.shape}: use 'iid'")
    return fjt_splits.dirichlet_split(targets, opts.num, opts.alpha, opts.seed, opts.min_size)
  except ValueError as e:  # The split functions name the 'replicas.*' key.
    raise ConfigError(str(e)) from e


def split_report(dataset: Dataset, shards: Sequence[np.ndarray], opts: ReplicaOptions
                 ) -> dict[str, Any]:
  """What ``splits.json`` says of a split: ``num``, ``split``, ``seed``, ``counts`` (examples per
  replica); ``class_counts`` ``[replica][class]`` for int class labels; ``alpha`` and
  ``min_size`` of ``dirichlet``; for ``by_source``, ``sources``: per replica ``{name: examples}``
  of the sources it holds, largest first."""
  report = {"num": opts.num, "split": opts.split, "seed": opts.seed,
            "counts": [len(s) for s in shards]}
  labels = dataset.train["y"]  # Class counts of in-memory int labels (not of token windows).
  if dataset.num_classes and isinstance(labels, (np.ndarray, jax.Array)) and labels.ndim == 1 \
      and jnp.issubdtype(labels.dtype, jnp.integer):
    report["class_counts"] = fjt_splits.split_counts(shards, labels, dataset.num_classes).tolist()
  if opts.split == "dirichlet":
    report.update(alpha=opts.alpha, min_size=opts.min_size)
  if opts.split == "by_source":
    names = dataset.sources.names
    per_source = fjt_splits.split_counts(shards, dataset.sources.ids, len(names))
    report["sources"] = [{names[i]: int(row[i]) for i in np.argsort(-row, kind="stable") if row[i]}
                         for row in per_source]
  return report


def _warm_start(model, tx, task, state: TrainState, dataset: Dataset, options: TrainOptions,
                global_batch: int, steps: int, mesh: Mesh, log: RunLog,
                progress: bool = True) -> TrainState:
  """``steps`` synchronous data-parallel steps of ``state`` on batches of ``global_batch`` (the
  warm start of DiLoCo), over the devices of ``mesh``; logs their train metrics (and, with
  ``progress``, a progress bar on the first process)."""
  state = put_replicated(state, mesh)
  train_step = make_train_step(model, tx, task, mesh=mesh, rng_streams=options.rng_streams)
  rows = process_rows(global_batch, mesh)
  window = []
  bar = tqdm(range(steps), disable=not (progress and jax.process_index() == 0), desc="warm start",
             unit="step", dynamic_ncols=True)
  for step in bar:
    local = fjt_data.get_batch(dataset.train, options.seed, step, global_batch, rows)
    state, metrics = train_step(state, put_split(local, mesh, global_batch))
    if needs_lockstep(mesh):
      jax.block_until_ready(metrics)
    window.append(metrics)
    if (step + 1) % options.log_every == 0 or step + 1 == steps:
      window = to_host(window)
      fjt_train.check_finite(window, step + 1 - len(window))  # Warm-start steps, not a round.
      log.write(step + 1, "train", {k: float(np.mean([m[k] for m in window])) for k in window[0]})
      window = []
  return to_host(state)


def fit(config: ml_collections.ConfigDict, workdir: str, model: nn.Module | None = None,
        dataset: Dataset | None = None, task: TaskLike | None = None,
        progress: bool = True) -> tuple[TrainState, dict[str, Any]]:
  """Trains ``config.replicas.num`` replicas for ``rounds`` rounds and evaluates the aggregate;
  returns (global state, summary).

  ``config.replicas``: ``num``, ``split`` (``iid`` | ``dirichlet`` | ``by_source``, see
  ``split_dataset``), ``alpha`` and ``min_size`` (dirichlet), ``seed`` (of the split),
  ``local_steps``, ``rounds``, ``warmup_steps``, ``server_optimizer``, ``server_learning_rate``,
  ``server_momentum``, ``optimizer_state``, ``communication_dtype``, ``baselines``.
  ``train.batch_size`` is each replica's batch size B; ``train.steps`` is set to
  ``warmup_steps + rounds * local_steps`` (each replica's optimizer steps, which the
  learning-rate schedule spans). Replica ``k``'s batches are ``fjt.data.splits.replica_batches``
  of its shard with seed ``config.seed``. ``model``, ``dataset`` and ``task`` replace what the
  config names, as in ``fjt.train.fit``.

  Writes to ``workdir`` (``fjt.logs.RunLog``): ``config.json``, ``splits.json``
  (``split_report``: examples, and examples per class or per source, of each replica),
  ``metrics.jsonl`` (per round: ``train`` metrics averaged over replicas and local steps,
  ``eval`` of the aggregate on the test split, at inner steps), ``metrics.png``, the final global
  state in ``final/``, each baseline's run (``baseline_config``) in ``<name>/``, and
  ``summary.json`` = ``{"step": rounds, "eval": {the task's metrics, the data's baselines
  (``unigram_perplexity``), "<baseline>_<metric>" ...}, "replicas": {...}, "communication":
  {...}, "seconds": {...}}``.
  """
  config = with_run_defaults(config)
  opts = ReplicaOptions.from_config(config)
  options = TrainOptions.from_config(config)
  config = _with_steps(config, opts.inner_steps)
  if TemporalAveraging.from_config(config).names:
    raise ConfigError(_NO_AVERAGES)
  check_model_widths(config)
  check_optimizer_config(config.optimizer)
  fjt_train.prepare_workdir(workdir)
  distributed.check_same_config(runs.as_record(config), os.path.abspath(workdir),
                                float(config.distributed.timeout_s))
  # A workdir's final state is its result: a rerun with another config is refused, as in fit.
  with runs.WorkdirLock(workdir, enabled=jax.process_index() == 0):
    runs.check_rerun(workdir, config, os.path.isdir(os.path.join(workdir, "final")))
    return _fit(config, workdir, opts, options, model, dataset, task, progress)


def _fit(config: ml_collections.ConfigDict, workdir: str, opts: ReplicaOptions,
         options: TrainOptions, model: nn.Module | None, dataset: Dataset | None,
         task: TaskLike | None, progress: bool) -> tuple[TrainState, dict[str, Any]]:
  rounds, local_steps, num, warmup = opts.rounds, opts.local_steps, opts.num, opts.warmup_steps
  baselines = {name: (baseline_config(config, name), os.path.join(workdir, name))
               for name in opts.baselines}
  for baseline, directory in baselines.values():
    _check_centralized_dir(directory, baseline)
  main = jax.process_index() == 0  # Only process 0 writes files other than checkpoints.
  dataset = dataset if dataset is not None else fjt_data.load_dataset(config.data)
  task = fjt_train.resolve_task(config, dataset, task)

  shards = split_dataset(dataset, opts)
  counts = [len(s) for s in shards]
  report = split_report(dataset, shards, opts)
  log = RunLog(workdir, config, enabled=main)
  if main:
    with open(os.path.join(workdir, "splits.json"), "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)

  tic = time.perf_counter()
  sharding_options = ShardingOptions.from_config(config)
  mesh = replica_mesh(num, fsdp=sharding_options.mesh.get(FSDP, 1))
  model = create_model(config.model) if model is None else model
  fjt_train.check_layout(model, dataset)
  example = jax.tree.map(lambda v: v[:1], dataset.train["x"])
  model, tx, state = create_from_config(config, example, model, options.rng_streams)
  fjt_train.check_model_fits_data(model, state, dataset, task)
  server_tx = create_server_optimizer(opts.server_optimizer, opts.server_learning_rate,
                                     opts.server_momentum)
  one, layout = None, None
  if FSDP in mesh.shape:  # Each replica's state split over its group's fsdp devices.
    one, layout = sharded_layout(model, tx, server_tx, example, mesh, sharding_options.rules,
                                 options.rng_streams)
  data_mesh = Mesh(mesh.devices, ("data",))  # Evaluation splits test batches over the devices.
  eval_step = make_eval_step(model, task, mesh=data_mesh)
  eval_batch_size = -(-options.eval_batch_size // mesh.size) * mesh.size
  if warmup:
    state = _warm_start(model, tx, task, state, dataset, options, num * options.batch_size,
                        warmup, data_mesh, log, progress)
    log.write(warmup, "eval", evaluate(eval_step, put_replicated(state, data_mesh), dataset.test,
                                       eval_batch_size, averages=False, mesh=data_mesh))
  communication = communication_bytes(state.params, opts)
  state = shard_state(replicate(state, num, server_tx), mesh, layout)
  run_round = make_round(model, tx, server_tx, mesh, opts.optimizer_state, task,
                         options.rng_streams, opts.communication_dtype, layout)
  weights = shard_replicas(np.asarray(counts, np.float32), mesh)
  mine = local_replicas(num, mesh)
  gather = jax.jit(lambda tree: tree, out_shardings=NamedSharding(mesh, P()))
  try:
    with tqdm(total=rounds, disable=not (progress and main), desc="rounds", unit="round",
              dynamic_ncols=True) as bar:
      for r in range(rounds):
        # Each process builds only the batches of its own replicas.
        batches = fjt_splits.replica_batches(dataset.train, [shards[k] for k in mine],
                                             options.seed, warmup + r * local_steps, local_steps,
                                             options.batch_size, first_replica=mine.start)
        state, metrics = run_round(state, put_local_replicas(batches, mesh, num), weights)
        metrics = to_host(gather(metrics))
        _check_finite(metrics["loss"], r + 1)
        inner = warmup + (r + 1) * local_steps  # Rows are at inner steps, as the baselines'.
        log.write(inner, "train", {k: float(np.mean(v)) for k, v in metrics.items()})
        eval_metrics = evaluate(eval_step, global_state(state, mesh), dataset.test,
                                eval_batch_size, averages=False, mesh=data_mesh)
        log.write(inner, "eval", eval_metrics)
        bar.set_postfix({task.headline: f"{eval_metrics[task.headline]:.4f}"}, refresh=False)
        bar.update()
  finally:
    log.close()
  final = global_state(state, mesh, one)
  checkpoint.save(os.path.join(workdir, "final"), final, force=True)
  replicas_seconds = time.perf_counter() - tic

  references = fjt_train.data_baselines(dataset)
  eval_metrics = {**eval_metrics, **references}
  seconds = {"replicas": replicas_seconds}
  for name, (baseline, directory) in baselines.items():
    tic = time.perf_counter()
    _, result = fjt_train.fit(baseline, directory, model=model, dataset=dataset, task=task,
                              progress=False)  # One summary line, not a line per eval.
    seconds[name] = time.perf_counter() - tic
    eval_metrics.update({f"{name}_{k}": v for k, v in result["eval"].items()
                         if k not in references})  # The data's own baselines once.
    if progress and main:
      print(f"{name} baseline ({baseline.train.steps} steps): " +
            ", ".join(f"{k} {v:.4f}" for k, v in result["eval"].items()), flush=True)

  summary = {
      "step": rounds,
      "eval": eval_metrics,
      "replicas": {**{k: v for k, v in report.items() if k != "sources"},  # In splits.json.
                   "local_steps": local_steps, "rounds": rounds,
                   "warmup_steps": warmup, "batch_size": options.batch_size,
                   "server_optimizer": opts.server_optimizer,
                   "server_learning_rate": opts.server_learning_rate,
                   "server_momentum": opts.server_momentum,
                   "optimizer_state": opts.optimizer_state},
      "communication": communication,
      "seconds": seconds,
  }
  log.finish(summary, task.headline, fjt_train.baseline_lines(dataset),
             curves={name: os.path.join(directory, "metrics.jsonl")
                     for name, (_, directory) in baselines.items()})
  return final, summary
