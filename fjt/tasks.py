"""Tasks: what a label is, what is minimised, and what is reported.

A ``Task`` is the only place in fjt that knows what a batch's targets mean. It bundles

- ``loss(outputs, batch) -> scalar``: what the train step minimises;
- ``eval_sums(outputs, batch) -> {name: float32 sum, ..., "count": float32}``: sums over a
  batch, so that metrics over many batches are exact ratios of sums;
- ``metrics(sums) -> {name: float}``: the reported metrics from (summed) ``eval_sums``;
- ``headline`` and ``mode``: the metric that says how good a model is, and whether
  higher (``"max"``) or lower (``"min"``) is better.

A batch is ``{"x": inputs, "y": targets}`` and may carry ``mask``: weights (1 keeps, 0 drops)
of the targets' shape, or of a prefix of it (``(B,)`` weighs whole examples). Shapes and
dtypes are checked when the step is traced: a target that does not fit is an error naming
both shapes, never a wrong number.

Built in (``TASKS``): ``"classification"``, ``"language_model"``, ``"regression"``; add your
own with ``register_task`` or pass a ``Task`` (or a plain ``loss_fn``) to the steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

Batch = Mapping[str, Any]
Sums = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Task:
  """A loss, the sums evaluation accumulates, the metrics made of them, and the headline.

  Attributes:
    name: how configs and logs refer to it.
    loss: ``loss(outputs, batch) -> float32 scalar``, minimised by the train step.
    eval_sums: ``eval_sums(outputs, batch) -> {name: float32 scalar}``, sums over the batch
      (``mask`` applied), including ``"count"``, the summed weight.
    metrics: ``metrics(sums) -> {name: float}`` from sums accumulated over batches.
    headline: the metric that ranks models (best checkpoint, soups).
    mode: ``"max"`` if a higher headline is better, ``"min"`` if lower.
    train_metrics: whether the train step also reports ``metrics(eval_sums(...))`` of its own
      batch (False where ``eval_sums`` costs more than the loss).

  ``metrics`` is plain arithmetic on its inputs, so it serves both the host (float64 sums of
  many batches) and the traced train step (one batch's sums).
  """
  name: str
  loss: Callable[[Any, Batch], jax.Array]
  eval_sums: Callable[[Any, Batch], Sums]
  metrics: Callable[[Mapping[str, float]], dict[str, float]]
  headline: str = "loss"
  mode: str = "min"
  train_metrics: bool = True

  def __post_init__(self):
    if self.mode not in ("max", "min"):
      raise ValueError(f"task {self.name!r}: mode must be 'max' or 'min', got {self.mode!r}")


def label_weights(batch: Batch, targets: jax.Array) -> jax.Array | None:
  """``batch["mask"]`` as float32 of ``targets``' shape, or None when the batch has no mask.

  A mask of a prefix of the targets' shape (``(B,)`` for targets ``(B, T)``) weighs whole
  examples; any other shape is an error naming both.
  """
  mask = batch.get("mask")
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.shape != targets.shape[:mask.ndim]:
    raise ValueError(f"batch 'mask' has shape {mask.shape}, which is neither the targets' shape "
                     f"{targets.shape} nor a prefix of it")
  mask = mask.reshape(mask.shape + (1,) * (targets.ndim - mask.ndim))
  return jnp.broadcast_to(mask, targets.shape).astype(jnp.float32)


def _weighted_mean(values: jax.Array, weights: jax.Array | None) -> jax.Array:
  if weights is None:
    return values.mean()
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _weighted_sum(values: jax.Array, weights: jax.Array | None) -> jax.Array:
  values = values.astype(jnp.float32)
  return jnp.sum(values if weights is None else values * weights)


def _count(targets: jax.Array, weights: jax.Array | None) -> jax.Array:
  return jnp.float32(targets.size) if weights is None else jnp.sum(weights)


def _exp(x):
  """``exp`` of a host number (float64, exact) or of a traced array."""
  return np.exp(x) if isinstance(x, (float, np.floating, np.ndarray)) else jnp.exp(x)


def _check_labels(task: str, logits, labels) -> None:
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"task {task!r}: labels 'y' must be integers (class ids), got dtype "
                     f"{labels.dtype}; for float targets use task 'regression'")
  if logits.shape[:-1] != labels.shape:
    raise ValueError(f"task {task!r}: the model's outputs have shape {logits.shape}, so labels "
                     f"'y' must have shape {logits.shape[:-1]} (one class id per output row), "
                     f"got {labels.shape}")


def _nll(task: str, logits, batch) -> jax.Array:
  labels = batch["y"]
  _check_labels(task, logits, labels)
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def classification(name: str = "classification", perplexity: bool = False) -> Task:
  """Softmax cross-entropy on int labels of shape ``outputs.shape[:-1]`` (``(B,)`` per example,
  ``(B, T)`` per token, ...). Metrics: ``loss`` (mean nats), ``accuracy`` (argmax hits) and,
  with ``perplexity``, ``perplexity = exp(loss)``."""

  def loss(logits, batch):
    return _weighted_mean(_nll(name, logits, batch), label_weights(batch, batch["y"]))

  def eval_sums(logits, batch):
    nll = _nll(name, logits, batch)
    weights = label_weights(batch, batch["y"])
    hits = jnp.argmax(logits, -1) == batch["y"]
    return {"loss": _weighted_sum(nll, weights), "correct": _weighted_sum(hits, weights),
            "count": _count(batch["y"], weights)}

  def metrics(sums):
    out = {"loss": sums["loss"] / sums["count"], "accuracy": sums["correct"] / sums["count"]}
    if perplexity:
      out["perplexity"] = _exp(out["loss"])
    return out

  if perplexity:
    return Task(name, loss, eval_sums, metrics, headline="perplexity", mode="min")
  return Task(name, loss, eval_sums, metrics, headline="accuracy", mode="max")


def regression(name: str = "regression") -> Task:
  """Mean squared error on float targets of the outputs' shape. Metrics: ``loss`` and ``mse``
  (mean squared error), ``mae`` (mean absolute error), over every target element."""

  def errors(outputs, batch):
    targets = batch["y"]
    if not jnp.issubdtype(targets.dtype, jnp.floating):
      raise ValueError(f"task {name!r}: targets 'y' must be floats, got dtype {targets.dtype}; "
                       "for class ids use task 'classification'")
    if outputs.shape != targets.shape:
      raise ValueError(f"task {name!r}: the model's outputs have shape {outputs.shape} but the "
                       f"targets 'y' have shape {targets.shape}; they must be equal")
    return outputs.astype(jnp.float32) - targets.astype(jnp.float32)

  def loss(outputs, batch):
    return _weighted_mean(jnp.square(errors(outputs, batch)), label_weights(batch, batch["y"]))

  def eval_sums(outputs, batch):
    err = errors(outputs, batch)
    weights = label_weights(batch, batch["y"])
    return {"squared_error": _weighted_sum(jnp.square(err), weights),
            "abs_error": _weighted_sum(jnp.abs(err), weights),
            "count": _count(batch["y"], weights)}

  def metrics(sums):
    mse = sums["squared_error"] / sums["count"]
    return {"loss": mse, "mse": mse, "mae": sums["abs_error"] / sums["count"]}

  return Task(name, loss, eval_sums, metrics, headline="mse", mode="min")


def from_loss_fn(loss_fn: Callable[[Any, Batch], jax.Array], name: str = "loss_fn") -> Task:
  """A task whose only metric is ``loss``: ``loss_fn(outputs, batch) -> scalar``, a mean over
  the batch's examples. Evaluation applies it to each example alone (``jax.vmap``), so padded
  rows and ``mask`` weigh exactly."""

  def eval_sums(outputs, batch):
    example = {k: v for k, v in batch.items() if k != "mask"}
    one = lambda o, b: loss_fn(o[None], jax.tree.map(lambda a: a[None], b))
    per_example = jax.vmap(one)(outputs, example).astype(jnp.float32)
    weights = batch.get("mask")
    if weights is not None:
      weights = jnp.asarray(weights, jnp.float32).reshape(per_example.shape[0], -1).mean(-1)
    return {"loss": _weighted_sum(per_example, weights), "count": _count(per_example, weights)}

  def metrics(sums):
    return {"loss": sums["loss"] / sums["count"]}

  return Task(name, loss_fn, eval_sums, metrics, headline="loss", mode="min", train_metrics=False)


TASKS: dict[str, Task] = {
    "classification": classification(),
    "language_model": classification("language_model", perplexity=True),
    "regression": regression(),
}


def register_task(task: Task) -> Task:
  """Adds ``task`` to ``TASKS`` under ``task.name`` (so ``config.task`` can name it)."""
  TASKS[task.name] = task
  return task


def get_task(task: str | Task | Callable) -> Task:
  """A ``Task`` from a name in ``TASKS``, a ``Task``, or a plain ``loss_fn(outputs, batch)``."""
  if isinstance(task, Task):
    return task
  if isinstance(task, str):
    if task not in TASKS:
      raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    return TASKS[task]
  if callable(task):
    return from_loss_fn(task, getattr(task, "__name__", "loss_fn"))
  raise TypeError(f"task must be a name, a fjt.Task or a loss_fn(outputs, batch), got {task!r}")
