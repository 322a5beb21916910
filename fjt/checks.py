"""Checks a run makes before and while it trains, shared by the loop and the tools around it.

Each raises one error a user can act on, naming the config key, step or path: a workdir that
cannot be written, a model that cannot take the data, a NaN loss.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fjt import data as fjt_data
from fjt.config import ConfigError
from fjt.data import Dataset
from fjt.state import TrainState, model_kwargs
from fjt.steps import TaskLike
from fjt.tasks import Task, get_task


class NonFiniteLossError(FloatingPointError):
  """The training loss, a parameter of the state or an eval metric became NaN or infinite."""

_HINT = "lower optimizer.learning_rate or set optimizer.grad_clip_norm"


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> jax.Array:
  """One bool per leaf: all its elements finite. One device computation, one small transfer."""
  return jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])


def check_finite_state(state, step: int) -> None:
  """Raises ``NonFiniteLossError`` naming ``step`` and the first array of ``state`` (any
  pytree) that holds a NaN or an infinity: the loop calls it before every save and at the end,
  so a non-finite state is never checkpointed and never ends a run that exits 0."""
  paths, leaves = [], []
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if isinstance(leaf, (jax.Array, np.ndarray)) and jnp.issubdtype(leaf.dtype, jnp.inexact):
      paths.append(jax.tree_util.keystr(path, simple=True, separator="/"))
      leaves.append(leaf)
  if not leaves:
    return
  flags = np.asarray(jax.device_get(_finite_flags(leaves)))
  if not flags.all():
    raise NonFiniteLossError(
        f"the state is not finite at step {step}: {int((~flags).sum())} of {len(flags)} arrays "
        f"hold NaN or inf (first: {paths[int(np.argmin(flags))]}); {_HINT}")


def check_finite_eval(metrics: dict[str, float], step: int, split: str = "validation") -> None:
  """Raises ``NonFiniteLossError`` naming the split and ``step`` if an eval metric is NaN or
  infinite (a result that is not a number is not reported as one)."""
  bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
  if bad:
    raise NonFiniteLossError(
        f"evaluation on the {split} split at step {step} is not finite: "
        + ", ".join(f"{k} {v}" for k, v in bad.items())
        + "; check the split's data (token ids below the vocabulary size, labels in range)")


def check_finite(window: list[dict[str, np.ndarray]], first_step: int) -> None:
  """Raises ``NonFiniteLossError`` naming the step of the first NaN or infinite ``loss`` in
  ``window``, the host metrics of the steps after ``first_step``."""
  for offset, metrics in enumerate(window):
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
      raise NonFiniteLossError(
          f"training loss is {loss} at step {first_step + offset + 1}; {_HINT}")


def prepare_workdir(workdir: str, subdirs: Sequence[str] = ()) -> str:
  """Creates ``workdir`` and its ``subdirs`` and checks that files can be written in each, so
  a read-only disk or directory is found before training, not at the first save."""
  for directory in (workdir, *(os.path.join(workdir, d) for d in subdirs)):
    try:
      os.makedirs(directory, exist_ok=True)
      probe = os.path.join(directory, f".fjt_write_test_{jax.process_index()}")
      with open(probe, "w") as f:
        f.write("ok")
      os.remove(probe)
    except OSError as e:
      what = "workdir" if directory == workdir else "directory"
      raise ConfigError(f"{what} {directory!r} is not writable: {e.strerror or e}; fix its "
                        "permissions or use another --workdir") from e
  return workdir


def resolve_task(name: str, dataset: Dataset, task: TaskLike | None = None) -> Task:
  """The task of a run: ``task`` if given, else ``name`` (config key ``task``), else the
  dataset's own."""
  try:
    return get_task(task if task is not None else (name or dataset.task))
  except ValueError as e:
    raise ConfigError(f"config key 'task': {e}") from e


def check_layout(model: nn.Module, dataset: Dataset) -> None:
  """An image layout the model does not take is an error that says what to move, raised
  before the model is initialised (Flax would fail on the shapes with a ZeroDivisionError)."""
  wants, has = getattr(model, "input_layout", ""), dataset.info.get("layout", "")
  if wants and has and wants != has:
    shape = np.shape(jax.tree.leaves(dataset.train["x"])[0])
    hint = ("move the channel axis to the end (x = np.moveaxis(x, 1, -1)) and save again"
            if (has, wants) == ("nchw", "nhwc") else f"convert the images to {wants.upper()}")
    raise ConfigError(
        f"config key 'data.layout': the data's images are {has.upper()} {shape} but "
        f"{type(model).__name__} takes {wants.upper()}; {hint}")


def check_model_fits_data(model: nn.Module, state: TrainState, dataset: Dataset,
                          task: Task) -> None:
  """An output width that is not the data's number of classes is an error naming the key."""
  example = jax.tree.map(lambda v: v[:1], dataset.train["x"])
  outputs = jax.eval_shape(lambda v: model.apply(v, example, **model_kwargs(model, False)),
                           state.variables)
  width = outputs.shape[-1] if outputs.ndim else None
  if dataset.num_classes is not None and task.name != "regression" and \
      width != dataset.num_classes:
    key = next((f"model.{a}" for a in ("vocab_size", "num_classes") if hasattr(model, a)), "model")
    raise ConfigError(f"config key {key!r}: {type(model).__name__} outputs {width} classes but "
                      f"the data has {dataset.num_classes}")


def check_batch_size(batch_size: int, dataset: Dataset, key: str = "train.batch_size") -> None:
  """A batch larger than the training split is an error naming ``key``."""
  if batch_size > dataset.num_train:
    raise ConfigError(f"config key {key!r}: {batch_size} is larger than the "
                      f"{dataset.num_train} training examples")


def metric_names(model: nn.Module, state: TrainState, dataset: Dataset, task: Task) -> list[str]:
  """The names of the metrics ``evaluate`` reports for ``task`` on ``dataset`` (without the
  ``ema_``/``swa_`` copies), found by tracing one batch, not computing it."""
  batch = next(fjt_data.eval_batches(jax.tree.map(lambda v: v[:1], dataset.test), 1))
  sums = jax.eval_shape(
      lambda v: task.eval_sums(model.apply(v, batch["x"], **model_kwargs(model, False)), batch),
      state.variables)
  return sorted(task.metrics({k: np.float64(1.0) for k in sums}))
