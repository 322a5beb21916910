"""Deterministic batching: a batch is a pure function of (seed, step).

Each epoch is a permutation of the examples drawn from
``jax.random.fold_in(PRNGKey(seed), epoch)``; step ``s`` takes slice
``s % steps_per_epoch`` of epoch ``s // steps_per_epoch`` (the remainder that does
not fill a batch is dropped). So a run resumed at step ``s`` sees exactly the
batches an uninterrupted run would, and every process of a multi-host run can
compute the same global batch and keep only its own rows.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

from fjt.data.dataset import num_examples


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  cpu = jax.local_devices(backend="cpu")[0]
  with jax.default_device(cpu):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), epoch)
    return np.asarray(jax.random.permutation(key, num_examples))


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  if batch_size > num_examples:
    raise ValueError(f"batch size {batch_size} is larger than the {num_examples} training examples")
  return num_examples // batch_size


def batch_indices(seed: int, step: int, num_examples: int, batch_size: int) -> np.ndarray:
  """Indices ``(batch_size,)`` int of the examples of global batch ``step``."""
  per_epoch = steps_per_epoch(num_examples, batch_size)
  epoch, offset = divmod(step, per_epoch)
  perm = _epoch_permutation(seed, epoch, num_examples)
  return perm[offset * batch_size:(offset + 1) * batch_size]


def get_batch(arrays: Mapping[str, Any], seed: int, step: int, batch_size: int,
              rows: slice = slice(None)) -> dict[str, Any]:
  """The training batch of ``step``: each array of ``arrays`` (a pytree, e.g. with a dict
  ``x``) indexed by ``batch_indices``.

  ``rows`` selects part of the global batch: the rows one process supplies in a
  multi-process run; only those examples are gathered.

  A split that draws its own batches (it has ``sample_batch(seed, step, batch_size, rows)``,
  e.g. ``fjt.data.windows.TokenWindows`` over a memory-mapped token file) is asked for them.
  """
  if hasattr(arrays, "sample_batch"):
    return arrays.sample_batch(seed, step, batch_size, rows)
  idx = batch_indices(seed, step, num_examples(arrays), batch_size)[rows]
  return jax.tree.map(lambda v: v[idx], arrays)


def eval_batches(arrays: Mapping[str, Any], batch_size: int) -> Iterator[dict[str, Any]]:
  """Every example once, in order, in batches of one fixed shape.

  The last batch is padded with copies of example 0. Every batch carries ``mask``:
  float32 ``(B,)``, 1 for real examples and 0 for padding, times the split's own
  ``mask`` where it has one (e.g. per-token weights ``(B, T)``), so one compiled eval
  step serves all batches and padding never counts.
  """
  total = num_examples(arrays)
  for start in range(0, total, batch_size):
    idx = np.arange(start, start + batch_size)
    valid = (idx < total).astype(np.float32)
    idx = np.where(idx < total, idx, 0)
    batch = jax.tree.map(lambda v: v[idx], dict(arrays))
    if "mask" in batch:
      own = np.asarray(batch["mask"], np.float32)
      batch["mask"] = own * valid.reshape((-1,) + (1,) * (own.ndim - 1))
    else:
      batch["mask"] = valid
    yield batch
