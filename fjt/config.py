"""Config files and command-line overrides.

A config file is a Python file with one ``get_config()`` returning an
``ml_collections.ConfigDict``. Overrides are ``a.b.c=VALUE`` strings, as in
``--config.train.steps=200`` on the command line. Every problem is a
``ConfigError`` whose one-line message names the file or key and what was
expected, so a CLI can print it instead of a traceback.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from collections.abc import Callable, Iterable, Sequence

import ml_collections


class ConfigError(ValueError):
  """A config file, key or value that cannot be used as given."""


# Every default of a run, in one place: ``load_config`` (and the loops, for configs built in
# code) adds the keys a config leaves out, so a file states only what it changes and
# ``--config.ema.decay=0.99`` works on any of them. Required keys (``seed``, ``data``,
# ``model``, ``optimizer``, ``train.steps``, ``train.batch_size``, ``train.eval_every``) have no
# default.
RUN_DEFAULTS = {
    "task": "",  # A name in fjt.TASKS; empty: the dataset's own (info["task"], else classification).
    # Resume or evaluate a run although its data changed since (fjt.data.fingerprint).
    "allow_changed_data": False,
    "train": {
        "log_every": 100,  # Steps between train-metric rows (and NaN checks).
        "eval_batch_size": 1024,
        "rng_streams": ("dropout",),  # Flax rng streams the train step supplies, one key each.
        "grad_accum_steps": 1,  # Micro-batches per optimizer step (batch_size is the total).
    },
    "checkpoint": {
        "every_steps": 0,  # 0: at the end only.
        "max_to_keep": 2,
        "best_metric": "",  # Also keep the best step by this eval metric; empty: newest only.
        "best_mode": "",  # max | min; empty: the task's mode.
        "fallback": False,  # Resume from an older step when the newest is damaged.
    },
    "ema": {"decay": 0.0},  # Exponential moving average of the params; 0 disables.
    "swa": {"start_step": 0, "every": 0},  # Stochastic weight averaging; every 0 disables.
    # Device mesh: batch rows split over data x fsdp; the state replicated over data, split
    # over fsdp (ZeRO-3) and model (Megatron). Sizes multiply to the device count; -1: the rest.
    "mesh": {"data": -1, "fsdp": 1, "model": 1},
    # Logical axis name of a parameter (nn.with_logical_partitioning) -> mesh axis or axes
    # (None: not split). Leaves fsdp does not split yet are split over it on their largest
    # dimension it divides (fjt.sharding.mesh_spec).
    "sharding_rules": (
        ("batch", ("data", "fsdp")),
        ("vocab", "model"),  # Embedding rows / LM-head columns.
        ("embed", "fsdp"),  # The model width C.
        ("mlp", "model"),  # MLP hidden (4C): column split in, row split out.
        ("heads", "model"),  # Attention heads (q/k/v columns, output-projection rows).
        ("kv", None),  # Width of one head.
        ("norm", None),  # LayerNorm/BatchNorm features (then split by fsdp as ZeRO-3).
    ),
    "distributed": {"timeout_s": 60},  # A peer silent this long ends a multi-process run.
    # GPU: --xla_gpu_deterministic_ops=true (bitwise-reproducible runs; slower scatter-adds and
    # reductions). CPU and TPU are deterministic already. See fjt.accelerators.
    "deterministic": True,
    "matmul_precision": "default",  # default | high | highest (jax.default_matmul_precision).
    # Keys fjt reads itself; every other key of the group is a keyword argument of the
    # optimizer's factory (fjt.optim: sgd's momentum and nesterov, adamw's b1, lion's b2, ...).
    "optimizer": {
        "schedule": "constant",  # constant | warmup_cosine
        "warmup_steps": 0,
        "final_lr_fraction": 0.0,  # warmup_cosine ends at learning_rate * this.
        "weight_decay": 0.0,  # Decoupled where the optimizer takes it (adamw), else L2.
        "grad_clip_norm": 0.0,  # Global-norm clipping; 0 disables.
        "decay_mask": "matrices",  # matrices | gpt: the leaves weight decay applies to.
    },
    "init_from": "",  # A checkpoint to start from (run workdir, step or saved directory).
    "init_skip": (),  # Path patterns (regex) not to load from init_from, e.g. a new head.
    "freeze": (),  # Path patterns (regex) of parameters that get no updates.
    # LoRA (fjt.lora): rank > 0 trains adapters W + alpha/rank * a @ b on the 2-D kernels whose
    # params paths match a pattern of targets; the base params stay frozen, as loaded.
    "lora": {"rank": 0, "alpha": 16.0, "targets": ()},
}

# The defaults of a ``replicas`` group (added only where a config has one).
REPLICA_DEFAULTS = {
    "split": "iid",  # iid | dirichlet (label skew) | by_source (whole sources, e.g. packages)
    "alpha": 0.5,  # Dirichlet concentration: smaller is more skewed.
    "min_size": 1,  # Examples per replica at least (dirichlet re-draws until it holds).
    "seed": 0,  # Of the split; batches use config.seed.
    "server_optimizer": "none",  # none | momentum (FedAvgM) | nesterov (DiLoCo outer step)
    "server_learning_rate": 1.0,
    "server_momentum": 0.0,
    "optimizer_state": "keep",  # keep (each replica its own) | average
    "warmup_steps": 0,  # Synchronous data-parallel steps before the first round (DiLoCo's warm start).
    "communication_dtype": "float32",  # float32 | bfloat16: the pseudo-gradients as averaged.
    "aggregate": "mean",  # A rule of fjt.aggregate.RULES: mean | median | trimmed_mean | yours.
    "trim_fraction": 0.1,  # trimmed_mean: drops floor(trim_fraction * num) values at each end.
    # A faulty replica, to measure robust rules: replica corrupt_replica (-1: none) sends
    # w + corrupt_scale * (w_k - w) every round.
    "corrupt_replica": -1,
    "corrupt_scale": -10.0,
    "baselines": ("centralized",),  # Runs trained beside: centralized/sync (batch N*B), single (B).
}


def _add_defaults(config: ml_collections.ConfigDict, defaults: dict) -> None:
  for key, value in defaults.items():
    if isinstance(value, dict):
      if key not in config or config[key] is None:
        config[key] = ml_collections.ConfigDict()
      _add_defaults(config[key], value)
    elif key not in config:
      config[key] = value


def copy_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A deep copy of ``config`` (``ConfigDict.copy_and_resolve_references``)."""
  return config.copy_and_resolve_references()


def with_run_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of ``config`` with each key of ``RUN_DEFAULTS`` (and, if it has a ``replicas``
  group, ``REPLICA_DEFAULTS``) that it lacks added, at any depth. ``config`` is not changed."""
  config = copy_config(config)
  _add_defaults(config, RUN_DEFAULTS)
  if config.get("replicas"):
    _add_defaults(config.replicas, REPLICA_DEFAULTS)
  return config


def load_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
  """Runs ``get_config()`` of the Python file at ``path``; adds the ``RUN_DEFAULTS`` it lacks."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist")
  name = "fjt_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # The user's file: report where it broke.
    raise ConfigError(f"config file {path!r} failed to load: {type(e).__name__}: {e}") from e
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"config file {path!r} defines no get_config()")
  try:
    config = module.get_config()
  except Exception as e:  # The user's function: report it as the file's error, in one line.
    raise ConfigError(f"get_config() in {path!r} raised {type(e).__name__}: {e}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(
        f"get_config() in {path!r} returned {type(config).__name__}, expected ml_collections.ConfigDict")
  return with_run_defaults(config)


def _suggest(key: str, known: Iterable[str]) -> str:
  close = difflib.get_close_matches(key, list(known), n=1)
  return f" (did you mean {close[0]!r}?)" if close else ""


def _parse_value(dotted: str, text: str, current):
  """Parses ``text`` as a Python literal of the type of ``current``."""
  if isinstance(current, str):
    return text
  if current is None:
    try:
      return ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return text
  if isinstance(current, bool):
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise ConfigError(f"config key {dotted!r}: expected a bool (true/false), got {text!r}")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if isinstance(current, (tuple, list)):  # --config.freeze=Conv_0 means ("Conv_0",).
      return type(current)((text,))
    raise ConfigError(
        f"config key {dotted!r}: expected {type(current).__name__}, got {text!r}") from None
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list, int, float, str)):
    value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return type(current)(value)
  if type(value) is not type(current):
    raise ConfigError(
        f"config key {dotted!r}: expected {type(current).__name__}, got {text!r}")
  return value


# Groups whose keys depend on their ``name`` (``data``: the dataset's options, ``model``: the
# model's attributes): group -> options(name) -> {key: default} or None if the name is unknown.
# Filled by ``fjt.data`` and ``fjt.models``, which know their registries.
SWITCHABLE_GROUPS: dict[str, Callable[[str], dict | None]] = {}
# Keys of a switchable group that keep their values when its ``name`` changes (the optimizer's
# learning rate and schedule are fjt's own keys; momentum or b1 belong to the old optimizer).
KEPT_ON_SWITCH: dict[str, tuple[str, ...]] = {}


def _switch_group(config: ml_collections.ConfigDict, group: str, name: str) -> None:
  """``config[group]`` for ``name``: its options at their defaults, and the old group's keys of
  ``KEPT_ON_SWITCH[group]``. Nothing else of the old group is kept: an option of the same name
  may mean something else (digits' ``layout`` is what to make, arrays' is what the file holds)."""
  defaults = SWITCHABLE_GROUPS[group](name)
  if defaults is not None:  # An unknown name: the loader's own error lists the known ones.
    kept = {k: v for k, v in config[group].items() if k in KEPT_ON_SWITCH.get(group, ())}
    config[group] = ml_collections.ConfigDict({"name": name, **defaults, **kept})


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """Sets ``a.b=VALUE`` overrides on a copy of ``config``; keys must exist.

  ``data.name=X`` and ``model.name=X`` are applied first and switch their group to X's
  options at their defaults (``--config.data.name=arrays --config.data.path=F.npz`` works on
  any config).
  """
  config = copy_config(config)
  switches = [o for o in overrides if o.partition("=")[0] in {f"{g}.name" for g in SWITCHABLE_GROUPS}]
  overrides = switches + [o for o in overrides if o not in switches]
  for item in overrides:
    dotted, sep, text = item.partition("=")
    if not sep:
      raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.steps=100")
    node, parts = config, dotted.split(".")
    for depth, part in enumerate(parts):
      here = ".".join(parts[:depth + 1])
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise ConfigError(f"config has no key {here!r}{_suggest(part, known)}")
      if depth < len(parts) - 1:
        node = node[part]
    current = node[parts[-1]]
    if isinstance(current, ml_collections.ConfigDict):
      raise ConfigError(f"config key {dotted!r} is a group; set one of its keys: {sorted(current)}")
    node[parts[-1]] = _parse_value(dotted, text, current)
    if len(parts) == 2 and parts[1] == "name" and parts[0] in SWITCHABLE_GROUPS \
        and node["name"] != current:
      _switch_group(config, parts[0], node["name"])
  return config


def require(config: ml_collections.ConfigDict, dotted: str, check, expected: str):
  """Returns ``config[dotted]`` after checking it; the error names the key."""
  node = config
  for part in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ConfigError(f"config has no key {dotted!r}, which is required")
    node = node[part]
  if not check(node):
    raise ConfigError(f"config key {dotted!r}: expected {expected}, got {node!r}")
  return node


def positive_int(value) -> bool:
  """A ``require`` check: an int above 0 (not a bool)."""
  return isinstance(value, int) and not isinstance(value, bool) and value > 0
