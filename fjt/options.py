"""Typed run options, built once from a config at the boundary.

The loops take these dataclasses and never name config keys; each ``from_config`` is the one
place a group of keys is read and checked, with errors that name the key. Defaults live in
``fjt.config.RUN_DEFAULTS`` (added by ``with_run_defaults``), not here.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from fjt.config import ConfigError, positive_int, require, with_run_defaults


def _int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class TrainOptions:
  """How the single-model loop runs: steps, batches, logging, evaluation, rng streams."""
  steps: int
  batch_size: int
  eval_every: int
  log_every: int
  eval_batch_size: int
  seed: int
  rng_streams: tuple[str, ...]
  grad_accum_steps: int

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> TrainOptions:
    config = with_run_defaults(config)
    options = cls(
        steps=require(config, "train.steps", positive_int, "a positive int"),
        batch_size=require(config, "train.batch_size", positive_int, "a positive int"),
        eval_every=require(config, "train.eval_every", positive_int, "a positive int"),
        log_every=require(config, "train.log_every", positive_int, "a positive int"),
        eval_batch_size=require(config, "train.eval_batch_size", positive_int, "a positive int"),
        seed=require(config, "seed", _int, "an int"),
        rng_streams=tuple(require(config, "train.rng_streams",
                                  lambda v: all(isinstance(s, str) and s for s in v),
                                  "a tuple of rng stream names")),
        grad_accum_steps=require(config, "train.grad_accum_steps", positive_int,
                                 "a positive int"),
    )
    if options.batch_size % options.grad_accum_steps:
      raise ConfigError(f"config key 'train.grad_accum_steps': {options.grad_accum_steps} "
                        f"micro-batches do not divide train.batch_size {options.batch_size}")
    return options


# Model attributes that are layer widths or counts of things: each must be positive.
_WIDTH_SUFFIXES = ("features", "num_classes", "vocab_size", "embed_dim", "hidden_dim", "num_heads")


def check_model_widths(config: ml_collections.ConfigDict) -> None:
  """Every width of ``config.model`` (``features``, ``dense_features``, ``num_classes``, ...: an
  int or a tuple of ints) is positive; Flax would fail later on a zero-size array."""
  model = config.get("model") or {}
  for key, value in model.items():
    if not key.endswith(_WIDTH_SUFFIXES):
      continue
    values = value if isinstance(value, (tuple, list)) else (value,)
    if not all(positive_int(v) for v in values):
      raise ConfigError(f"config key 'model.{key}': expected positive ints (layer widths), "
                        f"got {value!r}")


@dataclasses.dataclass(frozen=True)
class AcceleratorOptions:
  """Determinism and matmul precision (``fjt.accelerators``)."""
  deterministic: bool
  matmul_precision: str

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> AcceleratorOptions:
    config = with_run_defaults(config)
    return cls(
        deterministic=require(config, "deterministic", lambda v: isinstance(v, bool), "a bool"),
        matmul_precision=require(config, "matmul_precision",
                                 lambda v: v in ("default", "high", "highest"),
                                 "'default', 'high' or 'highest'"))


REPLICA_SPLITS = ("iid", "dirichlet", "by_source")  # fjt.data.splits: iid, dirichlet, source.
MESH_AXES = ("data", "fsdp", "model")  # As fjt.sharding.MESH_AXES (kept here: no jax import).


def _rule(pair) -> bool:
  if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)):
    return False
  axes = pair[1]
  axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
  return isinstance(axes, (tuple, list)) and all(a in MESH_AXES for a in axes)


@dataclasses.dataclass(frozen=True)
class ShardingOptions:
  """The device mesh and how the train state is laid out on it (``fjt.sharding``).

  ``mesh``: ``{axis: size}`` in ``MESH_AXES`` order (-1: the devices the others leave).
  ``rules``: ``((logical name, mesh axis | tuple of axes | None), ...)``.
  """
  mesh: dict[str, int]
  rules: tuple[tuple[str, str | tuple[str, ...] | None], ...]

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> ShardingOptions:
    config = with_run_defaults(config)
    mesh = dict(require(config, "mesh", lambda v: isinstance(v, ml_collections.ConfigDict),
                        "a group {data, fsdp, model} of axis sizes"))
    unknown = sorted(set(mesh) - set(MESH_AXES))
    if unknown:
      raise ConfigError(f"config key 'mesh.{unknown[0]}': unknown mesh axis; the axes are "
                        f"{MESH_AXES}")
    for name, size in mesh.items():
      if not (_int(size) and (size == -1 or size > 0)):
        raise ConfigError(f"config key 'mesh.{name}': expected a positive int or -1 (the "
                          f"devices the other axes leave), got {size!r}")
    rules = require(config, "sharding_rules", lambda v: isinstance(v, (tuple, list)) and
                    all(_rule(r) for r in v),
                    f"pairs (logical axis name, mesh axis in {MESH_AXES}, a tuple of them, or None)")
    return cls(mesh={a: mesh[a] for a in MESH_AXES if a in mesh},
               rules=tuple((name, tuple(axes) if isinstance(axes, list) else axes)
                           for name, axes in rules))


@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
  """When a run saves, what it keeps, and how it resumes."""
  every_steps: int  # 0: at the end only.
  max_to_keep: int
  best_metric: str
  best_mode: str  # "max" | "min" | "" (the task's mode).
  fallback: bool

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> CheckpointOptions:
    config = with_run_defaults(config)
    return cls(
        every_steps=require(config, "checkpoint.every_steps", lambda v: _int(v) and v >= 0,
                            "an int >= 0 (0: at the end only)"),
        max_to_keep=require(config, "checkpoint.max_to_keep", positive_int,
                            "a positive int (a run never deletes its last checkpoint)"),
        best_metric=require(config, "checkpoint.best_metric", lambda v: isinstance(v, str),
                            "a metric name, or empty"),
        best_mode=require(config, "checkpoint.best_mode", lambda v: v in ("", "max", "min"),
                          "'max', 'min' or empty (the task's mode)"),
        fallback=require(config, "checkpoint.fallback", lambda v: isinstance(v, bool), "a bool"),
    )


def _aggregation_rule(config: ml_collections.ConfigDict) -> str:
  """``replicas.aggregate``, the name of a registered aggregation rule (ConfigError otherwise)."""
  from fjt.aggregate import get_rule  # Above this module: the registry holds the rules.
  name = require(config, "replicas.aggregate", lambda v: isinstance(v, str), "a rule name")
  return get_rule(name, key="replicas.aggregate").name


@dataclasses.dataclass(frozen=True)
class ReplicaOptions:
  """N replicas trained in rounds (``fjt.replicas``)."""
  num: int
  split: str
  alpha: float
  min_size: int
  seed: int
  local_steps: int
  rounds: int
  server_optimizer: str
  server_learning_rate: float
  server_momentum: float
  optimizer_state: str
  warmup_steps: int
  communication_dtype: str
  baselines: tuple[str, ...]
  aggregate: str = "mean"
  trim_fraction: float = 0.1

  @property
  def inner_steps(self) -> int:
    """Optimizer steps of each replica: the warm start's and the rounds'."""
    return self.warmup_steps + self.rounds * self.local_steps

  @property
  def aggregate_params(self) -> dict[str, float]:
    """The parameters of rule ``aggregate`` that config keys set: ``trim`` (``trim_fraction``)."""
    from fjt.aggregate import get_rule  # Above this module: the registry holds the rules.
    return {"trim": self.trim_fraction} if "trim" in get_rule(self.aggregate).params else {}

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> ReplicaOptions:
    if not isinstance(config.get("replicas"), ml_collections.ConfigDict):
      raise ConfigError("config has no group 'replicas', which fjt.replicas.fit requires")
    config = with_run_defaults(config)
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    return cls(
        num=require(config, "replicas.num", positive_int, "a positive int"),
        split=require(config, "replicas.split", lambda v: v in REPLICA_SPLITS,
                      f"one of {REPLICA_SPLITS}"),
        alpha=float(require(config, "replicas.alpha", number, "a number")),
        min_size=require(config, "replicas.min_size", lambda v: _int(v) and v >= 0, "an int >= 0"),
        seed=require(config, "replicas.seed", _int, "an int"),
        local_steps=require(config, "replicas.local_steps", positive_int, "a positive int"),
        rounds=require(config, "replicas.rounds", positive_int, "a positive int"),
        server_optimizer=require(config, "replicas.server_optimizer", lambda v: isinstance(v, str),
                                 "a name"),
        server_learning_rate=float(require(config, "replicas.server_learning_rate", number,
                                           "a number")),
        server_momentum=float(require(config, "replicas.server_momentum", number, "a number")),
        optimizer_state=require(config, "replicas.optimizer_state", lambda v: isinstance(v, str),
                                "a name"),
        warmup_steps=require(config, "replicas.warmup_steps", lambda v: _int(v) and v >= 0,
                             "an int >= 0"),
        communication_dtype=require(config, "replicas.communication_dtype",
                                    lambda v: v in ("float32", "bfloat16"),
                                    "'float32' or 'bfloat16'"),
        baselines=tuple(require(config, "replicas.baselines",
                                lambda v: all(b in ("centralized", "sync", "single") for b in v),
                                "names among 'centralized', 'sync' (both: batch N*B) and "
                                "'single' (batch B)")),
        aggregate=_aggregation_rule(config),
        trim_fraction=float(require(config, "replicas.trim_fraction",
                                    lambda v: number(v) and 0 <= v < 0.5, "a number in [0, 0.5)")),
    )
