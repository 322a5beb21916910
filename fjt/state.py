"""The train state: one pytree holding everything a run saves, averages and shards."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import AbstractMesh, Mesh

from fjt import lora as fjt_lora
from fjt import sharding
from fjt.averaging import TemporalAveraging
from fjt.tree import unbox

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """All of a run's state; every field is a pytree of arrays.

  Attributes:
    step: int32 scalar, the number of optimizer steps taken.
    params: the model's ``params`` collection.
    batch_stats: the model's ``batch_stats`` collection (``{}`` without BatchNorm).
    opt_state: the optax state of ``params``.
    rng: uint32 ``(2,)`` PRNG key, folded with ``step`` for per-step randomness.
    averages: temporal averages of the variables (``fjt.averaging``):
      ``{"ema": variables, "swa": variables, "swa_count": int32}``, those enabled.
    base: with LoRA (``fjt.lora``), the frozen params that ``params`` (the adapters) adapt;
      ``{}`` otherwise. Saved and restored with the state, never updated.
    lora_alpha: with LoRA, the adapters' ``alpha`` (static: not a leaf).
  """
  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  rng: jax.Array
  averages: PyTree = dataclasses.field(default_factory=dict)
  base: PyTree = dataclasses.field(default_factory=dict)
  lora_alpha: float = flax.struct.field(pytree_node=False, default=0.0)

  def model_params(self, params: PyTree) -> PyTree:
    """The params the model applies for trained ``params``: with LoRA, ``base`` merged with
    the adapters ``params`` (``fjt.lora.merge``), else ``params``."""
    return fjt_lora.merge(self.base, params, self.lora_alpha) if self.base else params

  @property
  def variables(self) -> dict[str, PyTree]:
    """``{"params", "batch_stats"}``, as ``model.apply`` takes them (LoRA merged)."""
    return {"params": self.model_params(self.params), "batch_stats": self.batch_stats}


@functools.lru_cache(maxsize=64)
def _takes_train(cls: type) -> bool:
  try:
    return "train" in inspect.signature(cls.__call__).parameters
  except (TypeError, ValueError):
    return False


def model_kwargs(model: nn.Module, train: bool) -> dict[str, bool]:
  """``{"train": train}`` if ``model.__call__`` has a ``train`` parameter, else ``{}``: fjt's
  models take one, a plain ``nn.Dense`` or a user's module may not."""
  return {"train": train} if _takes_train(type(model)) else {}


def _boxed_variables(model: nn.Module, example_x: PyTree, rng: jax.Array,
                     rng_streams: Sequence[str] = ()) -> dict[str, PyTree]:
  rngs = {"params": rng, **{name: jax.random.fold_in(rng, i + 1)
                            for i, name in enumerate(rng_streams)}}
  variables = model.init(rngs, example_x, **model_kwargs(model, train=False))
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def init_variables(model: nn.Module, example_x: PyTree, rng: jax.Array,
                   rng_streams: Sequence[str] = ()) -> dict[str, PyTree]:
  """``model.init`` in eval mode: ``{"params": ..., "batch_stats": ...}`` (always both keys),
  plain arrays (logical-partitioning boxes removed).

  ``example_x`` is one batch of inputs (an array or a dict of arrays; only shapes and dtypes
  matter). ``rng`` seeds ``params``; each of ``rng_streams`` gets a key of its own, for models
  that draw from them even at init.
  """
  return unbox(_boxed_variables(model, example_x, rng, rng_streams))


def _boxed_train_state(model: nn.Module, tx: optax.GradientTransformation, example_x: PyTree,
                       rng: jax.Array, averaging: TemporalAveraging = TemporalAveraging(),
                       rng_streams: Sequence[str] = (), lora=None) -> TrainState:
  """``create_train_state`` with the parameters' ``nn.LogicallyPartitioned`` boxes kept, so
  the optimizer state and averages of a parameter carry its logical axis names too."""
  init_rng, state_rng = jax.random.split(rng)
  variables = _boxed_variables(model, example_x, init_rng, rng_streams)
  params, base, alpha = variables["params"], {}, 0.0
  if lora is not None and lora.rank:  # The adapters train; the params become the frozen base.
    base, alpha = params, lora.alpha
    params = fjt_lora.init(unbox(base), lora.rank, lora.targets, jax.random.fold_in(init_rng, 1))
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables["batch_stats"],
      opt_state=tx.init(params),
      rng=state_rng,
      averages=averaging.init(variables),
      base=base, lora_alpha=alpha)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       example_x: PyTree, rng: jax.Array,
                       averaging: TemporalAveraging = TemporalAveraging(),
                       rng_streams: Sequence[str] = (), lora=None) -> TrainState:
  """A fresh train state at step 0. Pure, so it can run under ``jax.jit`` or
  ``jax.eval_shape`` (for the shapes of a state without allocating it). ``lora``: a
  ``fjt.options.LoraOptions`` with a rank: ``params`` are adapters (``fjt.lora.init``) of the
  model's params, which become ``base``."""
  return _unbox_state(_boxed_train_state(model, tx, example_x, rng, averaging, rng_streams,
                                         lora))


def _unbox_state(state: TrainState) -> TrainState:
  return state.replace(**{f.name: unbox(getattr(state, f.name)) for f in dataclasses.fields(state)})


def state_shardings(model: nn.Module, tx: optax.GradientTransformation, example_x: PyTree,
                    mesh: Mesh | AbstractMesh, rules: sharding.Rules,
                    averaging: TemporalAveraging = TemporalAveraging(),
                    rng_streams: Sequence[str] = (), lora=None) -> TrainState:
  """The ``NamedSharding`` of every leaf of the train state on ``mesh``: a ``TrainState`` of
  shardings, found by tracing (nothing allocated). A parameter's optimizer moments and
  averages get the parameter's layout (``fjt.sharding.mesh_spec``)."""
  return sharding.logical_shardings(
      boxed_abstract_state(model, tx, example_x, averaging, rng_streams, lora), mesh, rules)


def boxed_abstract_state(model: nn.Module, tx: optax.GradientTransformation, example_x: PyTree,
                         averaging: TemporalAveraging = TemporalAveraging(),
                         rng_streams: Sequence[str] = (), lora=None) -> TrainState:
  """The shapes of a fresh train state (``jax.ShapeDtypeStruct``), the parameters' logical
  axis names kept in their ``nn.LogicallyPartitioned`` boxes; e.g. ``jax.eval_shape(
  server_tx.init, boxed.params)`` gives another optimizer's state its parameters' names."""
  return jax.eval_shape(lambda rng: _boxed_train_state(model, tx, example_x, rng, averaging,
                                                       tuple(rng_streams), lora),
                        jax.random.PRNGKey(0))


def _parts(options, model: nn.Module | None = None
           ) -> tuple[nn.Module, optax.GradientTransformation, TemporalAveraging]:
  """The model (``options.model``, unless given), optimizer and temporal averaging of a
  ``fjt.options.RunOptions``."""
  from fjt.models import create_model  # Local imports keep this module light.
  from fjt.optim import create_optimizer

  model = create_model(options.model) if model is None else model
  tx = create_optimizer(options.optimizer, options.train.steps, options.init.freeze)
  return model, tx, TemporalAveraging.from_options(options.averaging)


def create_state(options, example_x, model: nn.Module | None = None,
                 rng_streams: Sequence[str] = (), mesh: Mesh | None = None
                 ) -> tuple[nn.Module, optax.GradientTransformation, TrainState]:
  """The model (``options.model``, unless ``model`` is given), optimizer and fresh train state
  that a ``fjt.options.RunOptions`` describes.

  ``example_x`` is one batch of inputs (only its shape and dtype matter). With a ``mesh``, the
  state is created already laid out by ``state_shardings`` under ``options.sharding.rules``
  (``jax.jit`` with ``out_shardings``): it never exists whole on one device.
  """
  model, tx, averaging = _parts(options, model)
  streams = tuple(rng_streams)
  out_shardings = None if mesh is None else state_shardings(
      model, tx, example_x, mesh, options.sharding.rules, averaging, streams, options.lora)
  state = jax.jit(create_train_state, static_argnums=(0, 1, 4, 5, 6), out_shardings=out_shardings)(
      model, tx, example_x, jax.random.PRNGKey(options.seed), averaging, streams, options.lora)
  return model, tx, state


def create_from_config(config, example_x, model: nn.Module | None = None,
                       rng_streams: Sequence[str] = (), mesh: Mesh | None = None
                       ) -> tuple[nn.Module, optax.GradientTransformation, TrainState]:
  """``create_state`` of the options of ``config`` (``fjt.options.RunOptions``)."""
  from fjt.options import RunOptions
  return create_state(RunOptions.from_config(config), example_x, model, rng_streams, mesh)


def abstract_from_config(config, mesh: Mesh | AbstractMesh | None = None
                         ) -> tuple[nn.Module, TrainState]:
  """The model of ``config`` and the shapes of its fresh train state
  (``jax.ShapeDtypeStruct`` leaves, via ``jax.eval_shape``: nothing allocated). With a
  ``mesh`` (an ``AbstractMesh`` needs no devices: ``fjt.sharding.abstract_mesh``), each leaf
  carries its ``NamedSharding`` under ``config.sharding_rules``."""
  from fjt.data import load_dataset
  from fjt.options import RunOptions

  options = RunOptions.from_config(config)
  example = jax.tree.map(lambda v: v[:1], load_dataset(options.data).train["x"])
  model, tx, averaging = _parts(options)
  boxed = boxed_abstract_state(model, tx, example, averaging, lora=options.lora)
  abstract = _unbox_state(boxed)
  if mesh is not None:
    shardings = sharding.logical_shardings(boxed, mesh, options.sharding.rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
  return model, abstract


def _copy(tree: PyTree) -> PyTree:
  """Every array of ``tree`` in a new buffer (same dtype and sharding)."""
  return jax.tree.map(lambda a: a.copy() if hasattr(a, "copy") else a, tree)


def fork(state_or_variables: TrainState | PyTree, tx: optax.GradientTransformation | None = None,
         seed: int | None = None) -> TrainState | PyTree:
  """A branch of a train state (or of variables) that shares no buffer with it.

  The train step donates its state (``make_train_step``): after a step the arrays it was given
  are deleted, so two fine-tunes stepping the same base state would crash ("Array has been
  deleted"). A fork copies every array, so branches of one base (soups, seeds, sweeps) never
  touch each other's buffers or the base's.

  Args:
    state_or_variables: a ``TrainState``, or variables (``{"params", "batch_stats"}``).
    tx: the branch's optimizer: its fresh state ``tx.init(params)`` and step 0 (a new
      schedule). None: a state keeps a copy of its optimizer state and step; variables stay
      variables.
    seed: the branch's rng, ``PRNGKey(seed)``; None keeps (a copy of) the state's rng
      (variables with a ``tx``: ``PRNGKey(0)``).

  Returns:
    A ``TrainState`` (variables given with a ``tx`` included), or copied variables.
  """
  if not isinstance(state_or_variables, TrainState):
    variables = _copy(state_or_variables)
    if tx is None:
      return variables
    state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                       batch_stats=variables.get("batch_stats", {}), opt_state=None,
                       rng=jax.random.PRNGKey(0 if seed is None else seed))
    return state.replace(opt_state=tx.init(state.params))
  state = _copy(state_or_variables)
  if tx is not None:
    state = state.replace(step=jnp.zeros_like(state.step), opt_state=tx.init(state.params))
  if seed is not None:
    state = state.replace(rng=jax.random.PRNGKey(seed))
  return state
