"""N replicas trained together: local steps on their own data, then aggregation (FedAvg).

The N replicas are one pytree: a ``TrainState`` whose every leaf has a leading replica axis
(replica ``r`` is ``jax.tree.map(lambda x: x[r], replicas)``), all starting from the same init.
A round is one jit-compiled function::

  vmap over replicas (scan over local steps (train step))  ->  aggregate  ->  broadcast

with the example counts ``n_k`` of the replicas' shards as weights: ``params`` by the weighted
mean or another rule of ``fjt.aggregate``'s registry (``replicas.aggregate``; optionally through
a server optimizer), ``batch_stats`` by the exact pooled mean and
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

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fjt import checkpoint, optim
from fjt import data as fjt_data
from fjt.aggregate import (aggregate_stacked, get_rule, per_row, replica_batch_stats,
                           replica_mean)
from fjt.checks import (NonFiniteLossError, check_finite, check_layout, check_model_fits_data,
                        metric_names, resolve_task)
from fjt.config import ConfigError, copy_config
from fjt.data import Dataset, baseline_lines, data_baselines
from fjt.data import splits as fjt_splits
from fjt.files import write_atomic
from fjt.models import create_model
from fjt.options import ReplicaOptions, RunOptions, check_learning_rate
from fjt.program import Program, mean_row
from fjt.sharding import (FSDP, Rules, create_mesh, logical_shardings, needs_lockstep,
                          process_rows, put_global, put_like, put_replicated, put_split)
from fjt.state import PyTree, TrainState, boxed_abstract_state, create_state
from fjt.steps import TaskLike, evaluate, make_eval_step, train_step_fn

AXIS = "replica"
SERVER_OPTIMIZERS = ("none", "momentum", "nesterov")  # Besides every name of fjt.optim.
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


def _broadcast(tree: PyTree, num: int) -> PyTree:
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (num, *x.shape)), tree)


# ---------------------------------------------------------------------------------------------
# Replicas: creation, placement on devices, rounds.


def create_server_optimizer(name: str = "none", learning_rate: float = 1.0,
                            momentum: float = 0.0) -> optax.GradientTransformation | None:
  """The optimizer applied to the pseudo-gradient; None for plain FedAvg ("none", lr 1).

  ``"none"``: ``optax.sgd(lr)``; ``"momentum"``: ``optax.sgd(lr, momentum)`` (FedAvgM);
  ``"nesterov"``: ``optax.sgd(lr, momentum, nesterov=True)`` (DiLoCo's outer step); any other
  name is an optimizer of ``fjt.optim`` (its registry, or optax's: ``adam``, ``lion``, ...),
  given ``momentum`` where it takes one.
  """
  lr = check_learning_rate(learning_rate, "replicas.server_learning_rate")
  if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
    raise ConfigError("config key 'replicas.server_momentum': expected 0 <= momentum < 1, got "
                      f"{momentum!r}")
  if name == "none":
    return None if lr == 1.0 else optax.sgd(lr)
  if name in ("momentum", "nesterov"):
    return optax.sgd(lr, momentum=momentum or None, nesterov=name == "nesterov")
  optim.get_optimizer(name, "replicas.server_optimizer")
  if momentum and not optim.takes_argument(name, "momentum"):
    raise ConfigError(f"config key 'replicas.server_momentum': server optimizer {name!r} takes "
                      "no momentum; set it to 0")
  arguments = {"momentum": momentum} if momentum else {}
  return optim.make_optimizer(name, lr, arguments, group="replicas.server_optimizer")


def _fold_rngs(rng: jax.Array, num: int) -> jax.Array:
  """``(num, 2)``: ``fold_in(rng, r)`` for each replica ``r``."""
  return jax.vmap(lambda r: jax.random.fold_in(rng, r))(jnp.arange(num))


def replicate(state: TrainState, num_replicas: int,
              server_tx: optax.GradientTransformation | None = None,
              fold_rngs: bool = True) -> ReplicaState:
  """``num_replicas`` copies of ``state`` stacked on a leading axis, and the server's state.

  Every replica starts from the same params, batch statistics and optimizer state; replica
  ``r``'s rng is ``fold_in(state.rng, r)``, so their dropout masks differ (with ``fold_rngs``;
  else every row keeps ``state.rng``, for the warm start, ``make_warm_step``).
  """
  if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
    raise ConfigError(f"config key 'replicas.num': expected a positive int, got {num_replicas!r}")
  if jax.tree.leaves(state.averages):
    raise ConfigError(_NO_AVERAGES)
  replicas = _broadcast(state, num_replicas)
  if fold_rngs:
    replicas = replicas.replace(rng=_fold_rngs(state.rng, num_replicas))
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


def aggregation_rule(opts: ReplicaOptions) -> tuple[str, dict[str, float]]:
  """``(name, parameters)`` of the rule ``replicas.aggregate`` names (``fjt.aggregate.RULES``;
  an unknown name is a ``ConfigError`` naming the key): ``trim`` is ``replicas.trim_fraction``
  for the rules that take it."""
  rule = get_rule(opts.aggregate, key="replicas.aggregate")
  return rule.name, ({"trim": opts.trim_fraction} if "trim" in rule.params else {})


def make_round(model: nn.Module, tx: optax.GradientTransformation,
               server_tx: optax.GradientTransformation | None = None, mesh: Mesh | None = None,
               optimizer_state: str = "keep", task: TaskLike = "classification",
               rng_streams: Sequence[str] = ("dropout",), communication_dtype: str = "float32",
               layout: ReplicaState | None = None, aggregate: str = "mean",
               aggregate_params: Mapping[str, Any] | None = None,
               corrupt: tuple[int, float] | None = None
               ) -> Callable[[ReplicaState, Batch, jax.Array], tuple[ReplicaState, Metrics]]:
  """``run_round(state, batches, counts) -> (state, metrics)``, jit-compiled, ``state`` donated.

  ``batches`` holds ``x`` ``(N, L, B, ...)`` and ``y`` ``(N, L, B, ...)``: replica ``k`` takes
  ``L`` local steps (``local_step`` with ``task``), step ``t`` on ``batches[k, t]``. Then, with ``counts``
  ``(N,)`` the weights ``n_k``: params ``w <- agg_k(w_k)``, or with a ``server_tx`` or bfloat16
  communication ``w <- w + server_tx.update(g)`` (``w - g`` when ``server_tx`` is None) for the
  pseudo-gradient ``g = agg_k(w - w_k)``; ``agg`` is the registered rule ``aggregate`` over the
  replica axis (``fjt.aggregate.register``; ``aggregate_params`` over its defaults), by default
  the weighted mean (for which both forms agree); rules that merge task vectors relative to a
  base (``ties``, ``dare``, ``dare_ties``) take the round's global params as the base, through
  the pseudo-gradient form. ``batch_stats`` merged by
  ``replica_batch_stats``, optimizer states kept per replica (``"keep"``) or replaced by their
  ``replica_mean`` (``"average"``); the aggregate is broadcast to every replica. With
  ``communication_dtype="bfloat16"`` the pseudo-gradients ``w - w_k`` are averaged as bfloat16
  values (float32 sums). Metrics: the train step's (``loss``, ...), each ``(N, L)``. With ``mesh``, inputs and outputs are split over its
  ``"replica"`` axis (the server's state replicated), the state as ``layout`` says if given
  (``replica_shardings``: each replica's state split over ``fsdp`` too).

  ``corrupt=(k, scale)`` (config keys ``replicas.corrupt_replica``, ``corrupt_scale``) sends
  replica ``k``'s params as ``w + scale * (w_k - w)`` every round: a faulty or malicious
  replica, against which the robust rules (``median``, ``trimmed_mean``) are measured.
  """
  if optimizer_state not in OPTIMIZER_STATES:
    raise ConfigError(f"config key 'replicas.optimizer_state': expected one of "
                      f"{OPTIMIZER_STATES}, got {optimizer_state!r}")
  if communication_dtype not in COMMUNICATION_DTYPES:
    raise ConfigError(f"config key 'replicas.communication_dtype': expected one of "
                      f"{COMMUNICATION_DTYPES}, got {communication_dtype!r}")
  wire = jnp.dtype(communication_dtype)
  rule = get_rule(aggregate, key="replicas.aggregate")
  rule_params = rule.bind(aggregate_params)
  # Rules that merge task vectors (ties, dare) see the pseudo-gradients w - w_k with a zero
  # base: they are odd in the task vectors, so agg(w - w_k) = -(merge of the w_k - w).
  zero_base = lambda tree: jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), tree)
  combine = lambda tree, n: aggregate_stacked(rule, tree, n, rule_params,
                                              base=zero_base(tree) if rule.needs_base else None)

  def run_round(state: ReplicaState, batches: Batch, counts: jax.Array
                ) -> tuple[ReplicaState, Metrics]:
    start = state.replicas
    num = state.num_replicas
    n = jnp.asarray(counts, jnp.float32)
    step = functools.partial(local_step, model, tx, task=task, rng_streams=rng_streams)
    train_replica = lambda s, b: jax.lax.scan(step, s, b)
    trained, metrics = jax.vmap(train_replica)(start, batches)
    if corrupt is not None:
      bad, scale = corrupt
      hit = jnp.arange(num) == bad
      trained = trained.replace(params=jax.tree.map(
          lambda w, w_k: jnp.where(per_row(hit, w_k), w + scale * (w_k - w), w_k).astype(w_k.dtype),
          start.params, trained.params))
    server_opt_state = state.server_opt_state
    if server_tx is None and wire == jnp.float32 and not rule.needs_base:
      params = _broadcast(combine(trained.params, n), num)
    else:
      # Rows of start.params are all the global params w, so w - agg_k(w_k) = agg_k(w - w_k)
      # (for the mean; other rules aggregate the pseudo-gradients), and w + update stays equal
      # in every row without gathering w from one device.
      sent = jax.tree.map(lambda w, w_k: (w - w_k).astype(wire), start.params, trained.params)
      pseudo_grad = jax.tree.map(lambda g, w: g.astype(w.dtype), combine(sent, n), start.params)
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


def with_steps(options: RunOptions, steps: int) -> RunOptions:
  """``options`` with ``train.steps = steps``, in its record (``config.json``) too."""
  config = copy_config(options.config)
  config.train.steps = steps
  return dataclasses.replace(options, config=config,
                             train=dataclasses.replace(options.train, steps=steps))


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


def make_warm_step(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh,
                   task: TaskLike = "classification", rng_streams: Sequence[str] = ("dropout",),
                   layout: ReplicaState | None = None
                   ) -> Callable[[ReplicaState, Batch, bool], tuple[ReplicaState, Metrics]]:
  """``warm_step(state, batch, last) -> (state, metrics)``, jit-compiled, ``state`` donated: one
  synchronous data-parallel step (DiLoCo's warm start) of the model every replica holds (all
  rows of ``state`` are equal) on the global ``batch`` split over every device of ``mesh``,
  broadcast back to every row. With ``last``, the replicas' rngs are then folded with their
  index, as ``replicate`` does before the first round."""
  step = train_step_fn(model, tx, task, rng_streams=rng_streams)
  axes = tuple(mesh.axis_names)

  def warm_step(state: ReplicaState, batch: Batch, last: bool) -> tuple[ReplicaState, Metrics]:
    num = state.num_replicas
    one, metrics = step(jax.tree.map(lambda x: x[0], state.replicas), batch)
    replicas = _broadcast(one, num)
    if last:
      replicas = replicas.replace(rng=_fold_rngs(one.rng, num))
    return ReplicaState(replicas, state.server_opt_state), metrics

  shardings = ReplicaState(NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, P())) \
      if layout is None else layout
  return jax.jit(warm_step, static_argnums=2, donate_argnums=0,
                 in_shardings=(shardings, NamedSharding(mesh, P(axes))),
                 out_shardings=(shardings, NamedSharding(mesh, P())))


def _round_metrics(window: list[Mapping[str, np.ndarray]]) -> dict[str, float]:
  """A round's train row: each metric's mean over replicas and local steps, and each replica's
  mean loss (``replica_<k>_loss``), so a diverging replica shows."""
  row = mean_row(window)
  losses = np.mean(np.stack([m["loss"] for m in window]), axis=(0, 2))  # (N,)
  row.update({f"replica_{k}_loss": float(v) for k, v in enumerate(losses)})
  return row


def program(options: RunOptions, workdir: str, model: nn.Module | None = None,
            dataset: Dataset | None = None, task: TaskLike | None = None) -> Program:
  """N replicas in rounds as a ``fjt.program.Program`` of the one loop (``fjt.train.run``).

  Its state is a ``ReplicaState`` from the first step: the ``warmup_steps`` iterations of the
  warm start (``make_warm_step``: every row holds the one model), then ``rounds`` iterations of
  ``make_round``. Steps count each replica's optimizer steps (a round is ``local_steps`` of
  them), as ``train.steps``, ``checkpoint.every_steps`` and ``metrics.jsonl`` do. The warm start
  logs every ``train.log_every`` steps and is evaluated at its end; every round logs a train row
  (with each replica's loss) and evaluates the aggregate. ``finish`` saves the global model in
  ``WORKDIR/final`` and returns it with the summary. ``options.train.steps`` must be
  ``replicas.inner_steps`` (``with_steps``).
  """
  opts, train = options.replicas, options.train
  rounds, local_steps, num, warmup = opts.rounds, opts.local_steps, opts.num, opts.warmup_steps
  main = jax.process_index() == 0  # Only process 0 writes files other than checkpoints.
  if options.averaging.ema_decay or options.averaging.swa_every:
    raise ConfigError(_NO_AVERAGES)
  rule = aggregation_rule(opts)
  dataset = dataset if dataset is not None else fjt_data.load_dataset(options.data)
  task = resolve_task(options.task, dataset, task)
  shards = split_dataset(dataset, opts)
  counts = [len(s) for s in shards]
  report = split_report(dataset, shards, opts)
  if main:
    write_atomic(os.path.join(workdir, "splits.json"), json.dumps(report, indent=2))

  mesh = replica_mesh(num, fsdp=options.sharding.mesh.get(FSDP, 1))
  model = create_model(options.model) if model is None else model
  check_layout(model, dataset)
  example = jax.tree.map(lambda v: v[:1], dataset.train["x"])
  model, tx, one_state = create_state(options, example, model, train.rng_streams)
  check_model_fits_data(model, one_state, dataset, task)
  server_tx = create_server_optimizer(opts.server_optimizer, opts.server_learning_rate,
                                     opts.server_momentum)
  one, layout = None, None
  if FSDP in mesh.shape:  # Each replica's state split over its group's fsdp devices.
    one, layout = sharded_layout(model, tx, server_tx, example, mesh, options.sharding.rules,
                                 train.rng_streams)
  state = shard_state(replicate(one_state, num, server_tx, fold_rngs=not warmup), mesh, layout)
  communication = communication_bytes(one_state.params, opts)
  data_mesh = Mesh(mesh.devices, ("data",))  # Evaluation splits test batches over the devices.
  eval_step = make_eval_step(model, task, mesh=data_mesh)
  eval_batch_size = -(-train.eval_batch_size // mesh.size) * mesh.size
  corrupt = (opts.corrupt_replica, opts.corrupt_scale) if opts.corrupt_replica >= 0 else None
  run_round = make_round(model, tx, server_tx, mesh, opts.optimizer_state, task,
                         train.rng_streams, opts.communication_dtype, layout, *rule, corrupt)
  warm_step = make_warm_step(model, tx, mesh, task, train.rng_streams, layout)
  weights = shard_replicas(np.asarray(counts, np.float32), mesh)
  mine = local_replicas(num, mesh)
  global_batch = num * train.batch_size
  warm_rows = process_rows(global_batch, mesh, tuple(mesh.axis_names)) if warmup else None
  gather = jax.jit(lambda tree: tree, out_shardings=NamedSharding(mesh, P()))
  ends = [*range(1, warmup + 1), *(warmup + (r + 1) * local_steps for r in range(rounds))]

  def step(state: ReplicaState, i: int) -> tuple[ReplicaState, Metrics]:
    if i < warmup:
      local = fjt_data.get_batch(dataset.train, options.seed, i, global_batch, warm_rows)
      return warm_step(state, put_split(local, mesh, global_batch, tuple(mesh.axis_names)),
                       i == warmup - 1)
    first = warmup + (i - warmup) * local_steps
    # Each process builds only the batches of its own replicas.
    batches = fjt_splits.replica_batches(dataset.train, [shards[k] for k in mine], options.seed,
                                         first, local_steps, train.batch_size,
                                         first_replica=mine.start)
    state, metrics = run_round(state, put_local_replicas(batches, mesh, num), weights)
    return state, gather(metrics)

  def row(window):
    return _round_metrics(window) if np.ndim(window[0]["loss"]) == 2 else mean_row(window)

  def check(window, first_done):
    if np.ndim(window[0]["loss"]) != 2:
      return check_finite(window, first_done)  # Warm-start steps, not a round.
    for offset, metrics in enumerate(window):
      _check_finite(metrics["loss"], (first_done - warmup) // local_steps + offset + 1)

  def finish(state: ReplicaState, eval_metrics: dict[str, float]):
    final = global_state(state, mesh, one)
    checkpoint.save(os.path.join(workdir, "final"), final, force=True)
    summary = {
        "step": rounds,
        "eval": {**eval_metrics, **data_baselines(dataset)},
        "replicas": {**{k: v for k, v in report.items() if k != "sources"},  # In splits.json.
                     "local_steps": local_steps, "rounds": rounds,
                     "warmup_steps": warmup, "batch_size": train.batch_size,
                     "server_optimizer": opts.server_optimizer,
                     "server_learning_rate": opts.server_learning_rate,
                     "server_momentum": opts.server_momentum,
                     "optimizer_state": opts.optimizer_state,
                     "aggregate": rule[0], **rule[1]},
        "communication": communication,
    }
    return final, summary

  names = metric_names(model, one_state, dataset, task)
  return Program(
      state=state, ends=ends, step=step,
      evaluate=lambda state: evaluate(eval_step, global_state(state, mesh), dataset.test,
                                      eval_batch_size, averages=False, mesh=data_mesh),
      log_at=lambda i, done: i >= warmup - 1 or done % train.log_every == 0,
      eval_at=lambda i, done: i >= warmup - 1,
      row=row, check=check, start=lambda state: state, finish=finish,
      task=task.name, metric_names=names, headline=task.headline, mode=task.mode,
      baselines=baseline_lines(dataset), lockstep=needs_lockstep(mesh),
      desc="replicas")
