"""Optax optimizers and learning-rate schedules from ``config.optimizer``."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence

import jax
import optax

from fjt.config import ConfigError
from fjt.tree import tree_paths

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "warmup_cosine")
DECAY_MASKS = ("matrices", "gpt")


def create_learning_rate_fn(config: Mapping, total_steps: int) -> optax.Schedule:
  """``constant``: ``learning_rate`` throughout. ``warmup_cosine``: linear from 0
  to ``learning_rate`` over ``warmup_steps``, then cosine decay to
  ``learning_rate * final_lr_fraction`` at ``total_steps``."""
  lr = float(config["learning_rate"])
  schedule = config.get("schedule", "constant")
  if schedule == "constant":
    return optax.constant_schedule(lr)
  if schedule == "warmup_cosine":
    warmup = int(config.get("warmup_steps", 0))
    if not 0 <= warmup < total_steps:
      raise ConfigError(f"config key 'optimizer.warmup_steps': expected 0 <= value < train.steps "
                        f"({total_steps}), got {warmup}")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=total_steps,
        end_value=lr * float(config.get("final_lr_fraction", 0.0)))
  raise ConfigError(f"config key 'optimizer.schedule': expected one of {SCHEDULES}, got {schedule!r}")


def check_optimizer_config(config: Mapping) -> None:
  """``learning_rate > 0`` and ``momentum`` in [0, 1): outside them SGD climbs the loss (a
  negative rate) or its velocity never decays, and the run ends in NaN or 1e17 losses."""
  lr, momentum = config.get("learning_rate"), config.get("momentum", 0.0)
  if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
    raise ConfigError(f"config key 'optimizer.learning_rate': expected a number > 0, got {lr!r}")
  if not isinstance(momentum, (int, float)) or isinstance(momentum, bool) or \
      not 0 <= momentum < 1:
    raise ConfigError(f"config key 'optimizer.momentum': expected a number in [0, 1), "
                      f"got {momentum!r}")


def decay_mask(params, kind: str = "matrices"):
  """True for the leaves weight decay applies to. ``matrices``: every leaf with ndim > 1
  (kernels and embeddings; not biases or norm scales). ``gpt``: as GPT-2 recipes (nanoGPT),
  the kernels only: leaves with ndim > 1 except embedding tables (``.../embedding``)."""
  if kind == "matrices":
    return jax.tree.map(lambda p: p.ndim > 1, params)
  if kind == "gpt":
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim > 1 and getattr(path[-1], "key", None) != "embedding", params)
  raise ValueError(f"decay_mask: expected kind one of {DECAY_MASKS}, got {kind!r}")


def freeze_labels(params, freeze: Sequence[str]):
  """``"frozen"`` for each leaf whose path ``params/...`` matches a pattern of
  ``freeze`` (``re.search``), else ``"trainable"``. A pattern that matches no
  parameter is an error listing the parameters, since it is surely a typo."""
  paths = ["params/" + p for p in tree_paths(params)]
  for pattern in freeze:
    if not any(re.search(pattern, p) for p in paths):
      raise ConfigError(f"config key 'freeze': pattern {pattern!r} matches no parameter; "
                        f"parameters: {paths}")
  labels = ["frozen" if any(re.search(f, p) for f in freeze) else "trainable" for p in paths]
  return jax.tree.unflatten(jax.tree.structure(params), labels)


def create_optimizer(config: Mapping, total_steps: int,
                     freeze: Sequence[str] = ()) -> optax.GradientTransformation:
  """The optimizer of ``config.optimizer``.

  Keys: ``name`` (sgd | adam | adamw), ``learning_rate``, ``schedule`` and its
  keys, ``momentum`` and ``nesterov`` (sgd), ``weight_decay`` (sgd and adam: L2
  added to the gradient; adamw: decoupled), ``grad_clip_norm`` (global norm,
  0 disables), ``decay_mask`` (``decay_mask``'s kind: which leaves weight decay
  applies to; default ``matrices``, leaves with ndim > 1).

  ``freeze``: path patterns of parameters that get no updates: their updates
  are ``optax.set_to_zero`` and the optimizer keeps no state (momentum,
  moments) for them.
  """
  name = config.get("name")
  check_optimizer_config(config)
  lr = create_learning_rate_fn(config, total_steps)
  wd = float(config.get("weight_decay", 0.0))
  clip = float(config.get("grad_clip_norm", 0.0))
  if wd < 0 or clip < 0:
    raise ConfigError("config keys 'optimizer.weight_decay' and 'optimizer.grad_clip_norm' "
                      f"must be >= 0, got {wd} and {clip}")
  kind = config.get("decay_mask", "matrices")
  if kind not in DECAY_MASKS:
    raise ConfigError(f"config key 'optimizer.decay_mask': expected one of {DECAY_MASKS}, got {kind!r}")
  mask = functools.partial(decay_mask, kind=kind)
  chain = []
  if clip:
    chain.append(optax.clip_by_global_norm(clip))
  if name in ("sgd", "adam") and wd:
    chain.append(optax.add_decayed_weights(wd, mask=mask))
  if name == "sgd":
    momentum = float(config.get("momentum", 0.0))
    chain.append(optax.sgd(lr, momentum=momentum or None, nesterov=bool(config.get("nesterov", False))))
  elif name == "adam":
    chain.append(optax.adam(lr))
  elif name == "adamw":
    chain.append(optax.adamw(lr, weight_decay=wd, mask=mask))
  else:
    raise ConfigError(f"config key 'optimizer.name': expected one of {OPTIMIZERS}, got {name!r}")
  tx = optax.chain(*chain)
  if freeze:
    tx = optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()},
                               functools.partial(freeze_labels, freeze=tuple(freeze)))
  return tx
