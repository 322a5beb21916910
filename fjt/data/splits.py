"""A training set split over N replicas, and each replica's stream of batches.

``iid_split`` deals the examples out uniformly at random; ``dirichlet_split`` gives each replica
a skewed mix of labels (non-IID label skew, Hsu et al., 2019), the usual stress test of FedAvg;
``source_split`` gives each replica whole sources (for text: top-level packages, so replicas read
different modules' docstrings). Each returns one sorted int64 index array per replica; every
example is in exactly one of them.

A replica's batches are a pure function of (seed, replica, step): the shard is read as one
continuous stream of per-epoch permutations, so a batch may span two epochs and a shard smaller
than the batch (any size >= 1) still gives full batches.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import numpy as np


def _check_num_replicas(num_replicas: int, num_examples: int) -> None:
  if isinstance(num_replicas, bool) or not isinstance(num_replicas, (int, np.integer)) \
      or num_replicas < 1:
    raise ValueError(f"config key 'replicas.num': expected a positive int, got {num_replicas!r}")
  if num_replicas > num_examples:
    raise ValueError(f"config key 'replicas.num': {num_replicas} replicas cannot each get an "
                     f"example of the {num_examples} training examples")


def iid_split(labels: np.ndarray, num_replicas: int, seed: int) -> list[np.ndarray]:
  """A uniformly random partition of the ``len(labels)`` examples into ``num_replicas`` shards.

  The examples are permuted with ``seed`` and cut into consecutive pieces whose sizes differ by
  at most 1 (``np.array_split``). Returns ``num_replicas`` sorted int64 index arrays.
  """
  num_examples = len(labels)
  _check_num_replicas(num_replicas, num_examples)
  perm = np.random.default_rng(seed).permutation(num_examples)
  return [np.sort(part).astype(np.int64) for part in np.array_split(perm, num_replicas)]


def dirichlet_split(labels: np.ndarray, num_replicas: int, alpha: float, seed: int,
                    min_size: int = 1, max_draws: int = 1000) -> list[np.ndarray]:
  """Non-IID label skew: each class is shared out in Dirichlet(``alpha``) proportions.

  For each class ``c`` (in increasing order), its indices are permuted and proportions
  ``p_c ~ Dirichlet(alpha * 1_N)`` are drawn; replica ``r`` gets the consecutive piece
  ``[floor(n_c * P_{r-1}), floor(n_c * P_r))`` of the permuted indices, ``P_r = sum_{k<=r} p_ck``.
  Small ``alpha`` concentrates each class on few replicas; large ``alpha`` approaches an IID
  split. If some replica gets fewer than ``min_size`` examples the whole draw is repeated with
  the same generator (the usual rule), so the result is still a pure function of the arguments.

  Returns ``num_replicas`` sorted int64 index arrays covering every example exactly once.
  Raises ValueError when ``max_draws`` draws all leave a replica below ``min_size``.
  """
  labels = np.asarray(labels)
  _check_num_replicas(num_replicas, len(labels))
  if not np.isfinite(alpha) or alpha <= 0:
    raise ValueError(f"config key 'replicas.alpha': expected a positive number, got {alpha!r}")
  if min_size < 0 or min_size * num_replicas > len(labels):
    raise ValueError(f"config key 'replicas.min_size': {num_replicas} replicas of at least "
                     f"{min_size} examples do not fit in {len(labels)} examples")
  rng = np.random.default_rng(seed)
  by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
  smallest = 0
  for _ in range(max_draws):
    pieces: list[list[np.ndarray]] = [[] for _ in range(num_replicas)]
    for members in by_class:
      members = rng.permutation(members)
      p = rng.dirichlet(np.full(num_replicas, float(alpha)))
      cuts = np.floor(np.cumsum(p)[:-1] * len(members)).astype(np.int64)
      for r, piece in enumerate(np.split(members, np.minimum(cuts, len(members)))):
        pieces[r].append(piece)
    sizes = [sum(len(piece) for piece in p) for p in pieces]
    smallest = max(smallest, min(sizes))
    if min(sizes) >= min_size:
      return [np.sort(np.concatenate(p)).astype(np.int64) for p in pieces]
  raise ValueError(f"config key 'replicas.min_size': {max_draws} Dirichlet(alpha={alpha}) draws "
                   f"over {num_replicas} replicas all left a replica with fewer than {min_size} "
                   f"examples (the best had {smallest}); lower replicas.min_size or raise "
                   "replicas.alpha")


def source_split(sources: np.ndarray, num_replicas: int) -> list[np.ndarray]:
  """Non-IID by source: each source's examples all go to one replica, balanced by count.

  ``sources`` int ``(num_examples,)`` holds each example's source id. The sources present are
  dealt largest first (ties: smaller id first), each to the replica with the fewest examples so
  far (ties: lower index), so the first ``num_replicas`` go one to each replica. Deterministic.

  Returns ``num_replicas`` sorted int64 index arrays covering every example exactly once.
  Raises ValueError when there are fewer sources than replicas.
  """
  sources = np.asarray(sources)
  _check_num_replicas(num_replicas, len(sources))
  ids, counts = np.unique(sources, return_counts=True)
  if len(ids) < num_replicas:
    raise ValueError(f"config key 'replicas.split': 'by_source' gives each replica whole "
                     f"sources, but the training set has {len(ids)} sources for {num_replicas} "
                     "replicas; use fewer replicas or 'iid'")
  replica_of = np.empty(len(ids), np.int64)  # Indexed like ids.
  sizes = np.zeros(num_replicas, np.int64)
  for i in np.lexsort((ids, -counts)):
    replica_of[i] = np.argmin(sizes)  # The first of the smallest.
    sizes[replica_of[i]] += counts[i]
  example_replica = replica_of[np.searchsorted(ids, sources)]
  return [np.flatnonzero(example_replica == r).astype(np.int64) for r in range(num_replicas)]


def split_counts(splits: Sequence[np.ndarray], labels: np.ndarray, num_classes: int) -> np.ndarray:
  """int64 ``(N, num_classes)``: entry ``[r, c]`` is the number of examples of class ``c`` in
  shard ``r``; row sums are the shard sizes."""
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels lie in [{labels.min()}, {labels.max()}], outside the "
                     f"{num_classes} classes")
  return np.stack([np.bincount(labels[s], minlength=num_classes) for s in splits]).astype(np.int64)


@functools.lru_cache(maxsize=256)
def _shard_permutation(seed: int, replica: int, epoch: int, size: int) -> np.ndarray:
  perm = np.random.default_rng((seed, replica, epoch)).permutation(size)
  perm.setflags(write=False)  # Cached: callers must not change it.
  return perm


def stream_indices(seed: int, replica: int, first_step: int, num_steps: int, batch_size: int,
                   shard_size: int) -> np.ndarray:
  """int64 ``(num_steps, batch_size)``: positions in replica ``replica``'s shard of the examples
  of its batches ``first_step, ..., first_step + num_steps - 1``.

  Element ``i`` of batch ``s`` is stream position ``q = s * batch_size + i``, which is entry
  ``q mod shard_size`` of the permutation of epoch ``q // shard_size``; the permutation of an
  epoch is drawn from ``numpy.random.default_rng((seed, replica, epoch))``.
  """
  if shard_size < 1:
    raise ValueError(f"replica {replica} has an empty shard; every replica needs an example")
  positions = np.arange(first_step * batch_size, (first_step + num_steps) * batch_size)
  first_epoch, last_epoch = positions[0] // shard_size, positions[-1] // shard_size
  perms = np.concatenate([_shard_permutation(seed, replica, int(e), shard_size)
                          for e in range(first_epoch, last_epoch + 1)])
  return perms[positions - first_epoch * shard_size].reshape(num_steps, batch_size)


def replica_batches(arrays: Mapping[str, np.ndarray], shards: Sequence[np.ndarray], seed: int,
                    first_step: int, num_steps: int, batch_size: int,
                    first_replica: int = 0) -> dict[str, np.ndarray]:
  """The batches ``first_step ... first_step + num_steps - 1`` of replicas ``first_replica,
  first_replica + 1, ...`` (whose shards are ``shards``), stacked: each array of ``arrays``
  indexed to shape ``(len(shards), num_steps, batch_size, ...)``, replica ``r`` reading
  ``arrays[shards[r - first_replica][stream_indices(seed, r, ...)]]``."""
  idx = np.stack([shard[stream_indices(seed, first_replica + i, first_step, num_steps, batch_size,
                                       len(shard))]
                  for i, shard in enumerate(shards)])
  def take(v):  # One flat gather: lazy columns (token windows) index by 1-D arrays.
    rows = np.asarray(v[idx.reshape(-1)])
    return rows.reshape(idx.shape + rows.shape[1:])

  return jax.tree.map(take, dict(arrays))
