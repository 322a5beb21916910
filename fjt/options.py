"""Typed run options, built once from a config at the boundary.

``RunOptions.from_config(config)`` adds the defaults once (``fjt.config.with_run_defaults``, on
a copy) and reads every group; the loops below ``fjt.experiment`` take these dataclasses and
never name config keys. Each ``_read`` is the one place a group of keys is read and checked,
with errors that name the key; each ``from_config`` is that group alone (defaults added).
Defaults live in ``fjt.config.RUN_DEFAULTS`` and ``REPLICA_DEFAULTS``, not here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import ml_collections

from fjt.config import RUN_DEFAULTS, ConfigError, positive_int, require, with_run_defaults


def _int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


SCHEDULES = ("constant", "warmup_cosine")  # fjt.optim.create_learning_rate_fn
DECAY_MASKS = ("matrices", "gpt")  # fjt.optim.decay_mask
# Keys of ``config.optimizer`` that fjt reads itself; the others go to the optimizer's factory.
GENERIC_OPTIMIZER_KEYS = ("name", "learning_rate", *RUN_DEFAULTS["optimizer"])
FLOAT32_MAX = 3.4028234663852886e38


def check_learning_rate(value, key: str) -> float:
  """``value`` as a float if it is a finite number in (0, float32's largest]; else a
  ``ConfigError`` naming ``key`` (a learning rate that overflows float32 makes every update
  infinite)."""
  if not (_number(value) and 0 < value <= FLOAT32_MAX):
    raise ConfigError(f"config key {key!r}: expected a finite number > 0 that fits float32, "
                      f"got {value!r}")
  return float(value)


class _FromConfig:
  """``from_config(config)``: the group of keys of one options class, defaults added on a copy.
  ``RunOptions`` adds them once and calls ``_read`` of every group."""

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict):
    return cls._read(with_run_defaults(config))


@dataclasses.dataclass(frozen=True)
class TrainOptions(_FromConfig):
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
  def _read(cls, config: ml_collections.ConfigDict) -> TrainOptions:
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

  rate = model.get("dropout_rate", 0.0)
  if not (_number(rate) and 0 <= rate < 1):
    raise ConfigError(f"config key 'model.dropout_rate': expected a number in [0, 1), got {rate!r}")


def check_float32(config: Mapping | ml_collections.ConfigDict, prefix: str = "") -> None:
  """Every finite float of ``config`` fits float32 (a value past its largest, 3.4e38, becomes
  infinite on the device and every update with it)."""
  for key, value in config.items():
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):
      check_float32(value, f"{prefix}{key}.")
    elif isinstance(value, float) and math.isfinite(value) and abs(value) > FLOAT32_MAX:
      raise ConfigError(f"config key '{prefix}{key}': {value!r} overflows float32 (largest "
                        f"{FLOAT32_MAX:.4g})")


@dataclasses.dataclass(frozen=True)
class AcceleratorOptions(_FromConfig):
  """Determinism and matmul precision (``fjt.accelerators``)."""
  deterministic: bool
  matmul_precision: str

  @classmethod
  def _read(cls, config: ml_collections.ConfigDict) -> AcceleratorOptions:
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
class ShardingOptions(_FromConfig):
  """The device mesh and how the train state is laid out on it (``fjt.sharding``).

  ``mesh``: ``{axis: size}`` in ``MESH_AXES`` order (-1: the devices the others leave).
  ``rules``: ``((logical name, mesh axis | tuple of axes | None), ...)``.
  """
  mesh: dict[str, int]
  rules: tuple[tuple[str, str | tuple[str, ...] | None], ...]

  @classmethod
  def _read(cls, config: ml_collections.ConfigDict) -> ShardingOptions:
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
class CheckpointOptions(_FromConfig):
  """When a run saves, what it keeps, and how it resumes."""
  every_steps: int  # 0: at the end only.
  max_to_keep: int
  best_metric: str
  best_mode: str  # "max" | "min" | "" (the task's mode).
  fallback: bool

  @classmethod
  def _read(cls, config: ml_collections.ConfigDict) -> CheckpointOptions:
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


@dataclasses.dataclass(frozen=True)
class ReplicaOptions(_FromConfig):
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
  corrupt_replica: int = -1
  corrupt_scale: float = -10.0

  @property
  def inner_steps(self) -> int:
    """Optimizer steps of each replica: the warm start's and the rounds'."""
    return self.warmup_steps + self.rounds * self.local_steps

  @classmethod
  def _read(cls, config: ml_collections.ConfigDict) -> ReplicaOptions:
    if not isinstance(config.get("replicas"), ml_collections.ConfigDict):
      raise ConfigError("config has no group 'replicas', which a replica run requires")
    number = _number
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
        # A name of fjt.aggregate's registry: fjt.replicas.aggregation_rule checks it.
        aggregate=require(config, "replicas.aggregate", lambda v: isinstance(v, str) and v,
                          "the name of an aggregation rule (fjt.aggregate.RULES)"),
        trim_fraction=float(require(config, "replicas.trim_fraction",
                                    lambda v: number(v) and 0 <= v < 0.5, "a number in [0, 0.5)")),
        corrupt_replica=require(
            config, "replicas.corrupt_replica",
            lambda v: _int(v) and -1 <= v < config.replicas.num,
            f"-1 (none) or a replica index below replicas.num ({config.replicas.get('num')})"),
        corrupt_scale=float(require(config, "replicas.corrupt_scale", number, "a number")),
    )


@dataclasses.dataclass(frozen=True)
class OptimizerOptions(_FromConfig):
  """``config.optimizer`` (``fjt.optim.create_optimizer``): the keys fjt reads itself, and
  ``arguments``, the other keys, for the optimizer's factory (sgd's ``momentum``, ...)."""
  name: str
  learning_rate: float
  schedule: str
  warmup_steps: int
  final_lr_fraction: float
  weight_decay: float
  grad_clip_norm: float
  decay_mask: str
  arguments: tuple[tuple[str, Any], ...] = ()

  @classmethod
  def _read(cls, config: ml_collections.ConfigDict) -> OptimizerOptions:
    require(config, "optimizer", lambda v: isinstance(v, (Mapping, ml_collections.ConfigDict)),
            "a group")
    return cls.from_mapping(config.optimizer)

  @classmethod
  def from_mapping(cls, group: Mapping[str, Any], key: str = "optimizer") -> OptimizerOptions:
    """From the mapping ``group`` (``config.optimizer``; missing keys take ``RUN_DEFAULTS``);
    errors name ``key.<name>``."""
    values = {**RUN_DEFAULTS["optimizer"], **dict(group)}
    def get(name, check, expected):
      value = values.get(name)
      if not check(value):
        raise ConfigError(f"config key '{key}.{name}': expected {expected}, got {value!r}")
      return value
    non_negative = lambda v: _number(v) and v >= 0
    arguments = {k: v for k, v in values.items() if k not in GENERIC_OPTIMIZER_KEYS}
    if "momentum" in arguments:
      get("momentum", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)")
    return cls(
        name=get("name", lambda v: isinstance(v, str) and v, "an optimizer name"),
        learning_rate=check_learning_rate(values.get("learning_rate"), f"{key}.learning_rate"),
        schedule=get("schedule", lambda v: v in SCHEDULES, f"one of {SCHEDULES}"),
        warmup_steps=get("warmup_steps", lambda v: _int(v) and v >= 0, "an int >= 0"),
        final_lr_fraction=float(get("final_lr_fraction", non_negative, "a number >= 0")),
        weight_decay=float(get("weight_decay", non_negative, "a number >= 0")),
        grad_clip_norm=float(get("grad_clip_norm", non_negative, "a number >= 0 (0: off)")),
        decay_mask=get("decay_mask", lambda v: v in DECAY_MASKS, f"one of {DECAY_MASKS}"),
        arguments=tuple(sorted(arguments.items())))


@dataclasses.dataclass(frozen=True)
class AveragingOptions(_FromConfig):
  """Temporal averages of the params (``fjt.averaging``): EMA decay (0: off) and SWA from
  ``swa_start`` every ``swa_every`` steps (0: off)."""
  ema_decay: float
  swa_start: int
  swa_every: int

  @classmethod
  def _read(cls, config: ml_collections.ConfigDict) -> AveragingOptions:
    return cls(
        ema_decay=float(require(config, "ema.decay", lambda v: _number(v) and 0 <= v < 1,
                                "a number in [0, 1) (0: off)")),
        swa_start=require(config, "swa.start_step", lambda v: _int(v) and v >= 0, "an int >= 0"),
        swa_every=require(config, "swa.every", lambda v: _int(v) and v >= 0,
                          "an int >= 0 (0: off)"))


@dataclasses.dataclass(frozen=True)
class InitOptions(_FromConfig):
  """Where a run's weights start: ``init_from`` (a checkpoint; empty: fresh), ``init_skip``
  (path patterns not loaded), ``freeze`` (patterns of params without updates) and ``pretrain``
  (a config trained first into ``WORKDIR/pretrain``; None: none)."""
  init_from: str
  init_skip: tuple[str, ...]
  freeze: tuple[str, ...]
  pretrain: ml_collections.ConfigDict | None

  @classmethod
  def _read(cls, config: ml_collections.ConfigDict) -> InitOptions:
    patterns = lambda v: isinstance(v, (tuple, list)) and all(isinstance(p, str) for p in v)
    pretrain = config.get("pretrain") or None
    if pretrain is not None and not isinstance(pretrain, ml_collections.ConfigDict):
      raise ConfigError(f"config key 'pretrain': expected a config group, got {pretrain!r}")
    return cls(
        init_from=require(config, "init_from", lambda v: isinstance(v, str), "a path or empty"),
        init_skip=tuple(require(config, "init_skip", patterns, "a tuple of regex patterns")),
        freeze=tuple(require(config, "freeze", patterns, "a tuple of regex patterns")),
        pretrain=pretrain)

  @property
  def fine_tune(self) -> bool:
    """Whether the run starts from other weights (``init_from`` or ``pretrain``)."""
    return bool(self.init_from or self.pretrain)


@dataclasses.dataclass(frozen=True)
class LoraOptions(_FromConfig):
  """LoRA adapters (``fjt.lora``): ``rank`` (0: off; the whole model trains), ``alpha`` (the
  update is ``alpha / rank * a @ b``) and ``targets`` (regexes on params paths, each matching
  2-D kernels only)."""
  rank: int
  alpha: float
  targets: tuple[str, ...]

  @classmethod
  def _read(cls, config: ml_collections.ConfigDict) -> LoraOptions:
    options = cls(
        rank=require(config, "lora.rank", lambda v: _int(v) and v >= 0, "an int >= 0 (0: off)"),
        alpha=float(require(config, "lora.alpha", lambda v: _number(v) and v > 0,
                            "a number > 0")),
        targets=tuple(require(config, "lora.targets", lambda v: isinstance(v, (tuple, list))
                              and all(isinstance(p, str) and p for p in v),
                              "a tuple of regex patterns on params paths")))
    if options.rank and not options.targets:
      raise ConfigError("config key 'lora.targets': lora.rank > 0 needs the kernels to adapt, "
                        "e.g. (r'attn/c_attn/kernel$',)")
    if options.rank and config.get("replicas"):
      raise ConfigError("config key 'lora.rank': LoRA trains one model; replica runs "
                        "(config group 'replicas') do not take it")
    if options.rank and (config.ema.decay or config.swa.every):
      raise ConfigError("config key 'lora.rank': EMA/SWA averages of LoRA runs are not "
                        "supported; set ema.decay=0 and swa.every=0")
    return options


@dataclasses.dataclass(frozen=True)
class DistributedOptions(_FromConfig):
  """Multi-process runs (``fjt.distributed``): a peer silent ``timeout_s`` seconds is lost."""
  timeout_s: float

  @classmethod
  def _read(cls, config: ml_collections.ConfigDict) -> DistributedOptions:
    return cls(timeout_s=float(require(config, "distributed.timeout_s",
                                       lambda v: _number(v) and v > 0, "a number of seconds > 0")))


@dataclasses.dataclass(frozen=True)
class RunOptions:
  """Every option of a run, read once from its config (``from_config``).

  ``config`` is the config with its defaults (a copy: the caller's is unchanged), kept for the
  run's record (``config.json``) and for the ``data`` and ``model`` groups, which are the keyword
  arguments of the dataset's loader and the model's class (their registries check them).
  ``replicas`` is None for a single-model run.
  """
  config: ml_collections.ConfigDict
  seed: int
  task: str
  train: TrainOptions
  checkpoint: CheckpointOptions
  accelerator: AcceleratorOptions
  sharding: ShardingOptions
  optimizer: OptimizerOptions
  averaging: AveragingOptions
  init: InitOptions
  distributed: DistributedOptions
  replicas: ReplicaOptions | None
  lora: LoraOptions = LoraOptions(rank=0, alpha=16.0, targets=())

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> RunOptions:
    config = with_run_defaults(config)
    check_model_widths(config)
    options = cls(
        config=config,
        seed=require(config, "seed", _int, "an int"),
        task=require(config, "task", lambda v: isinstance(v, str), "a task name, or empty"),
        train=TrainOptions._read(config),
        checkpoint=CheckpointOptions._read(config),
        accelerator=AcceleratorOptions._read(config),
        sharding=ShardingOptions._read(config),
        optimizer=OptimizerOptions._read(config),
        averaging=AveragingOptions._read(config),
        init=InitOptions._read(config),
        distributed=DistributedOptions._read(config),
        replicas=ReplicaOptions._read(config) if config.get("replicas") else None,
        lora=LoraOptions._read(config))
    check_float32(config)  # After the groups: their own checks name their keys first.
    return options

  @property
  def data(self) -> ml_collections.ConfigDict:
    """``config.data``: the dataset's name and its loader's keyword arguments."""
    return self.config.data

  @property
  def model(self) -> ml_collections.ConfigDict:
    """``config.model``: the model's name and its class's attributes."""
    return self.config.model
