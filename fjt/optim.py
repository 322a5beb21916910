"""Optimizers by name, learning-rate schedules, weight-decay masks and frozen parameters.

An optimizer is a factory ``f(learning_rate, **arguments) -> optax.GradientTransformation``
found by name: first in ``OPTIMIZERS`` (``register`` adds your own), else in optax itself
(any ``optax.<name>`` taking ``learning_rate``: ``lion``, ``adafactor``, ``lamb``, ...), as
big_vision does. The keys of ``config.optimizer`` that fjt reads itself (the schedule, weight
decay, clipping: ``fjt.options.GENERIC_OPTIMIZER_KEYS``) wrap the factory; every other key is
one of its keyword arguments, checked against its signature::

  @fjt.optim.register("my_sgd")
  def my_sgd(learning_rate, momentum=0.0):
    return optax.sgd(learning_rate, momentum or None)

The same registry gives the server (outer) optimizer of replica rounds
(``fjt.replicas.create_server_optimizer``).
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import optax

from fjt import config as fjt_config
from fjt.config import ConfigError
from fjt.options import DECAY_MASKS, GENERIC_OPTIMIZER_KEYS, SCHEDULES, OptimizerOptions
from fjt.tree import tree_paths

Factory = Callable[..., optax.GradientTransformation]
OPTIMIZERS: dict[str, Factory] = {}


def register(name: str) -> Callable[[Factory], Factory]:
  """Decorator: ``OPTIMIZERS[name] = factory``, so ``config.optimizer.name = name`` builds it
  (also as ``replicas.server_optimizer``). ``factory(learning_rate, **arguments)`` returns an
  ``optax.GradientTransformation``; its keyword arguments are the config's other keys."""
  def add(factory: Factory) -> Factory:
    OPTIMIZERS[name] = factory
    return factory
  return add


@register("sgd")
def sgd(learning_rate, momentum: float = 0.0, nesterov: bool = False
        ) -> optax.GradientTransformation:
  """``optax.sgd``; ``momentum`` 0 keeps no velocity (``optax.sgd(momentum=None)``)."""
  return optax.sgd(learning_rate, momentum=momentum or None, nesterov=bool(nesterov))


def _optax_factory(name: str) -> Factory | None:
  factory = getattr(optax, name, None) if not name.startswith("_") else None
  if not callable(factory) or isinstance(factory, type):
    return None
  try:
    return factory if "learning_rate" in inspect.signature(factory).parameters else None
  except (TypeError, ValueError):
    return None


def get_optimizer(name: str, key: str = "optimizer.name") -> Factory:
  """The factory of optimizer ``name`` (``OPTIMIZERS``, else ``optax.<name>``); an unknown
  name is a ``ConfigError`` naming ``key``."""
  factory = (OPTIMIZERS.get(name) or _optax_factory(name)) if isinstance(name, str) else None
  if factory is None:
    raise ConfigError(f"config key {key!r}: {name!r} is not an optimizer; expected one of "
                      f"{tuple(sorted(OPTIMIZERS))} or the name of an optax optimizer taking "
                      "learning_rate (e.g. 'adam', 'lion', 'adafactor')")
  return factory


def _parameters(factory: Factory) -> dict[str, inspect.Parameter]:
  return {k: p for k, p in inspect.signature(factory).parameters.items()
          if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def optimizer_arguments(name: str) -> dict[str, Any] | None:
  """The keyword arguments of optimizer ``name`` with plain defaults (numbers, strings, bools,
  None) besides ``learning_rate`` and what fjt sets (``weight_decay``, ``mask``): the keys
  ``--config.optimizer.name=NAME`` gives the group. None for an unknown name."""
  try:
    factory = get_optimizer(name)
  except ConfigError:
    return None
  return {k: p.default for k, p in _parameters(factory).items()
          if k not in ("learning_rate", "weight_decay", "mask")
          and (p.default is None or isinstance(p.default, (bool, int, float, str)))}


fjt_config.SWITCHABLE_GROUPS["optimizer"] = optimizer_arguments
fjt_config.KEPT_ON_SWITCH["optimizer"] = GENERIC_OPTIMIZER_KEYS


def make_optimizer(name: str, learning_rate: float | optax.Schedule, arguments: Mapping[str, Any],
                   group: str = "optimizer") -> optax.GradientTransformation:
  """``factory(learning_rate, **arguments)`` of optimizer ``name``; an argument the factory does
  not take is a ``ConfigError`` naming ``group.<argument>`` and the ones it takes."""
  factory = get_optimizer(name, f"{group}.name")
  takes = _parameters(factory)
  for key in arguments:
    if key not in takes or key == "learning_rate":
      known = sorted(k for k in takes if k != "learning_rate")
      raise ConfigError(f"config key '{group}.{key}': optimizer {name!r} takes no argument "
                        f"{key!r}; it takes {known}")
  try:
    return factory(learning_rate, **arguments)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config key '{group}': optimizer {name!r} refused its arguments "
                      f"{dict(arguments)}: {e}".splitlines()[0]) from e


def takes_argument(name: str, argument: str) -> bool:
  """Whether optimizer ``name``'s factory has a keyword argument ``argument``."""
  return argument in _parameters(get_optimizer(name))


def create_learning_rate_fn(config: Mapping, total_steps: int) -> optax.Schedule:
  """``constant``: ``learning_rate`` throughout. ``warmup_cosine``: linear from 0
  to ``learning_rate`` over ``warmup_steps``, then cosine decay to
  ``learning_rate * final_lr_fraction`` at ``total_steps``. ``config``: ``config.optimizer``
  or a ``fjt.options.OptimizerOptions``."""
  get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
  lr = float(get("learning_rate"))
  schedule = get("schedule", "constant")
  if schedule == "constant":
    return optax.constant_schedule(lr)
  if schedule == "warmup_cosine":
    warmup = int(get("warmup_steps", 0))
    if not 0 <= warmup < total_steps:
      raise ConfigError(f"config key 'optimizer.warmup_steps': expected 0 <= value < train.steps "
                        f"({total_steps}), got {warmup}")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=total_steps,
        end_value=lr * float(get("final_lr_fraction", 0.0)))
  raise ConfigError(f"config key 'optimizer.schedule': expected one of {SCHEDULES}, got {schedule!r}")


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


def create_optimizer(config, total_steps: int,
                     freeze: Sequence[str] = ()) -> optax.GradientTransformation:
  """The optimizer that ``config`` describes: ``config.optimizer`` (a mapping) or a
  ``fjt.options.OptimizerOptions``.

  ``name`` (``get_optimizer``: fjt's registry or any optax optimizer), ``learning_rate`` and
  its ``schedule`` (``create_learning_rate_fn``), ``weight_decay`` (decoupled, with the
  ``decay_mask``, where the factory takes ``weight_decay`` as adamw and lion do; else L2 added
  to the gradient before it, as for sgd and adam), ``grad_clip_norm`` (global norm, first; 0
  disables), and the factory's own keyword arguments (sgd's ``momentum`` and ``nesterov``, ...).

  ``freeze``: path patterns of parameters that get no updates: their updates
  are ``optax.set_to_zero`` and the optimizer keeps no state (momentum,
  moments) for them.
  """
  options = config if isinstance(config, OptimizerOptions) else OptimizerOptions.from_mapping(config)
  lr = create_learning_rate_fn(options, total_steps)
  mask = functools.partial(decay_mask, kind=options.decay_mask)
  arguments = dict(options.arguments)
  takes = _parameters(get_optimizer(options.name))
  decoupled = "weight_decay" in takes
  if decoupled:
    arguments["weight_decay"] = options.weight_decay
    if "mask" in takes:
      arguments["mask"] = mask
  chain = []
  if options.grad_clip_norm:
    chain.append(optax.clip_by_global_norm(options.grad_clip_norm))
  if options.weight_decay and not decoupled:
    chain.append(optax.add_decayed_weights(options.weight_decay, mask=mask))
  chain.append(make_optimizer(options.name, lr, arguments))
  tx = optax.chain(*chain)
  if freeze:
    tx = optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()},
                               functools.partial(freeze_labels, freeze=tuple(freeze)))
  return tx
