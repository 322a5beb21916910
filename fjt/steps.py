"""Pure train and eval steps built from a model, an optax optimizer and a task.

``train_step(state, batch) -> (state, metrics)`` and ``eval_step(variables, batch) -> sums``
are pure functions; ``make_*`` compile them with ``jax.jit`` (the state donated). A batch is
``{"x": inputs, "y": targets}`` plus an optional ``mask`` (see ``fjt.tasks``); ``x`` may be an
array or a dict of arrays, passed to the model as its one positional argument. The model's
``train`` argument is passed only if its ``__call__`` takes one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from fjt import data as fjt_data
from fjt import sharding
from fjt.averaging import TemporalAveraging
from fjt.state import PyTree, TrainState, model_kwargs
from fjt.tasks import Task, get_task

Batch = Mapping[str, Any]
Metrics = dict[str, jax.Array]
TaskLike = str | Task | Callable[[Any, Batch], jax.Array]


def _jit(fn, mesh: Mesh | None, state_sharding: PyTree | None = None, returns_state=False,
         **kwargs):
  """``jax.jit``; over a mesh, the batch (argument 1) split over the mesh's batch axes
  (``data``, ``fsdp``), argument 0 (state or variables) laid out by ``state_sharding`` (default:
  replicated), and the outputs replicated except a returned state, laid out as it came in."""
  if mesh is None:
    return jax.jit(fn, **kwargs)
  whole = sharding.replicated(mesh)
  state_sharding = whole if state_sharding is None else state_sharding
  return jax.jit(fn, in_shardings=(state_sharding, sharding.split(mesh)),
                 out_shardings=(state_sharding, whole) if returns_state else whole, **kwargs)


def _step_rngs(rng: jax.Array, step: jax.Array, streams: Sequence[str]) -> dict[str, jax.Array]:
  """One key per rng stream for ``step``: the first stream gets ``fold_in(rng, step)``, stream
  ``i > 0`` that key folded with ``i``."""
  key = jax.random.fold_in(rng, step)
  return {name: key if i == 0 else jax.random.fold_in(key, i) for i, name in enumerate(streams)}


def _micro_batches(batch: Batch, num: int) -> Batch:
  """``batch`` with leading axis ``G = num * B`` as ``(num, B, ...)``: micro-batch ``j`` holds
  rows ``j, num + j, 2 num + j, ...``, so each device keeps its own rows when ``G`` is split
  over a mesh."""
  def split(x):
    if x.shape[0] % num:
      raise ValueError(f"a batch of {x.shape[0]} rows does not split into {num} micro-batches "
                       "(config key 'train.grad_accum_steps'); use a batch size divisible by it")
    return jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def train_step_fn(model: nn.Module, tx: optax.GradientTransformation,
                  task: TaskLike = "classification", *,
                  averaging: TemporalAveraging = TemporalAveraging(),
                  rng_streams: Sequence[str] = ("dropout",), grad_accum_steps: int = 1
                  ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """The pure, un-jitted ``train_step(state, batch) -> (state, metrics)``.

  The loss is ``task``'s (a name in ``fjt.TASKS``, a ``fjt.Task``, or a plain
  ``loss_fn(outputs, batch) -> scalar``). BatchNorm statistics are those of the batch and the
  running averages are updated, as are the EMA/SWA weights of ``averaging``. Each stream of
  ``rng_streams`` gets its own key per step. With ``grad_accum_steps = k > 1`` the batch's
  ``k * B`` rows are ``k`` micro-batches of ``B`` (``jax.lax.scan``): the gradient is the mean
  of theirs, which for a mean loss equals the gradient of the whole batch. Metrics: ``loss``
  and, for tasks with ``train_metrics``, ``task.metrics`` of the batch (scalars). Compose it
  freely (``jax.vmap`` over replicas, ``jax.lax.scan`` over steps); ``make_train_step`` is it
  jitted.
  """
  task = get_task(task)
  streams, kwargs = tuple(rng_streams), model_kwargs(model, train=True)
  if grad_accum_steps < 1:
    raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")

  def grads_and_metrics(state, params, batch_stats, batch, rngs):
    def loss_fn(params):  # Differentiated w.r.t. the trained params (LoRA: the adapters only).
      outputs, updates = model.apply({"params": state.model_params(params),
                                      "batch_stats": batch_stats}, batch["x"],
                                     mutable=["batch_stats"], rngs=rngs, **kwargs)
      loss = task.loss(outputs, batch)
      metrics = task.metrics(task.eval_sums(outputs, batch)) if task.train_metrics else {}
      return loss, ({**metrics, "loss": loss}, updates.get("batch_stats", batch_stats))

    (_, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, batch_stats, metrics

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    rngs = _step_rngs(state.rng, state.step, streams)
    if grad_accum_steps == 1:
      grads, batch_stats, metrics = grads_and_metrics(state, state.params, state.batch_stats,
                                                      batch, rngs)
    else:
      def micro(carry, inputs):
        grad_sum, batch_stats = carry
        index, micro_batch = inputs
        micro_rngs = {k: jax.random.fold_in(r, index) for k, r in rngs.items()}
        grads, batch_stats, metrics = grads_and_metrics(state, state.params, batch_stats,
                                                        micro_batch, micro_rngs)
        return (jax.tree.map(jnp.add, grad_sum, grads), batch_stats), metrics

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grad_sum, batch_stats), metrics = jax.lax.scan(
          micro, (zeros, state.batch_stats),
          (jnp.arange(grad_accum_steps), _micro_batches(batch, grad_accum_steps)))
      grads = jax.tree.map(lambda g: g / grad_accum_steps, grad_sum)
      metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    averages = averaging.update(state.averages, {"params": params, "batch_stats": batch_stats},
                                state.step + 1)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state, averages=averages)
    return new_state, metrics

  return train_step


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    task: TaskLike = "classification", *,
                    averaging: TemporalAveraging = TemporalAveraging(), mesh: Mesh | None = None,
                    state_sharding: TrainState | None = None,
                    rng_streams: Sequence[str] = ("dropout",), grad_accum_steps: int = 1
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """``train_step_fn`` jit-compiled, ``state`` donated. With a ``mesh``, the batch is split over
  its ``data`` and ``fsdp`` axes and the state laid out by ``state_sharding`` (a
  ``TrainState`` of shardings, ``fjt.state.state_shardings``; default: replicated): the
  gradient and the BatchNorm statistics are those of the global batch."""
  return _jit(train_step_fn(model, tx, task, averaging=averaging, rng_streams=rng_streams,
                            grad_accum_steps=grad_accum_steps), mesh, state_sharding,
              returns_state=True, donate_argnums=0)


@dataclasses.dataclass(frozen=True)
class EvalStep:
  """``eval_step(variables, batch) -> sums`` (jit-compiled) and the task that reads the sums."""
  fn: Callable[[PyTree, Batch], dict[str, jax.Array]]
  task: Task

  def __call__(self, variables: PyTree, batch: Batch) -> dict[str, jax.Array]:
    return self.fn(variables, batch)


def make_eval_step(model: nn.Module, task: TaskLike = "classification", *,
                   mesh: Mesh | None = None, variables_sharding: PyTree | None = None
                   ) -> EvalStep:
  """``eval_step(variables, batch) -> sums``, jit-compiled, the model in eval mode (BatchNorm's
  running statistics, no dropout). ``variables`` is ``{"params", "batch_stats"}``, laid out by
  ``variables_sharding`` over a ``mesh`` (default: replicated); the sums are
  ``task.eval_sums`` (float32 scalars), so metrics over many batches are exact ratios of sums."""
  task = get_task(task)
  kwargs = model_kwargs(model, train=False)

  def eval_step(variables: PyTree, batch: Batch) -> dict[str, jax.Array]:
    outputs = model.apply({"params": variables["params"],
                           "batch_stats": variables.get("batch_stats", {})}, batch["x"], **kwargs)
    return task.eval_sums(outputs, batch)

  return EvalStep(_jit(eval_step, mesh, variables_sharding), task)


def evaluate(eval_step: EvalStep, variables: PyTree | TrainState,
             arrays: Mapping[str, Any], batch_size: int, *, averages: bool = True,
             mesh: Mesh | None = None) -> dict[str, float]:
  """``eval_step.task``'s metrics over every example of ``arrays`` once (float64 sums of the
  batches' float32 sums).

  ``variables`` is ``{"params", "batch_stats"}`` or a ``TrainState``; for a state with
  ``averages``, the metrics of each temporal average follow, prefixed (``ema_accuracy``,
  ``swa_loss``, ...). With a ``mesh``, each process supplies its rows of every batch
  (``eval_step`` made with the same mesh).
  """
  state = variables if isinstance(variables, TrainState) else None
  variables = state.variables if state is not None else variables
  batches = fjt_data.eval_batches(arrays, batch_size)
  if mesh is not None:
    rows = sharding.process_rows(batch_size, mesh)
    batches = (sharding.put_split(jax.tree.map(lambda v: v[rows], b), mesh, batch_size)
               for b in batches)
  sums = []
  for batch in batches:
    sums.append(eval_step(variables, batch))
    if mesh is not None and sharding.needs_lockstep(mesh):
      jax.block_until_ready(sums[-1])
  totals = {k: np.sum([np.float64(s[k]) for s in sharding.to_host(sums)]) for k in sums[0]}
  metrics = {k: float(v) for k, v in eval_step.task.metrics(totals).items()}
  if averages and state is not None:
    for name in ("ema", "swa"):
      if name in state.averages and not (name == "swa" and int(state.averages["swa_count"]) == 0):
        for key, value in evaluate(eval_step, state.averages[name], arrays, batch_size,
                                   averages=False, mesh=mesh).items():
          metrics[f"{name}_{key}"] = value
  return metrics


__all__ = ["EvalStep", "evaluate", "make_eval_step", "make_train_step", "train_step_fn"]
