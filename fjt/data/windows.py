"""Windows of a 1-D token stream, read lazily: the language-model view of a token array.

A ``TokenWindows`` split is a mapping ``{"x", "y"}`` like every fjt split, but its columns are
views that gather only the rows asked for from the stream (an ``np.memmap`` or an in-memory
array): window ``i`` starts at ``i * stride``, ``x[i] = tokens[s : s + T]`` and
``y[i] = tokens[s + 1 : s + T + 1]`` (the next token of each position), int32 ``(T,)``.
So a 2 GB token file is never read whole: a batch touches only the pages of its windows.

Training draws its own batches (``sample_batch``): window starts uniform over every start
(``stride`` does not matter), drawn by ``numpy.random.default_rng((seed, step))`` — a pure
function of (seed, step) that needs no permutation of the (possibly 10^9) starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class _Column:
  """``x`` (``shift=0``) or ``y`` (``shift=1``) of a ``TokenWindows``: int32 ``(N, T)``,
  indexed by an int, a slice or an index array without reading the rest of the stream."""
  windows: TokenWindows
  shift: int
  mask: bool = False  # The float32 weights of ``y`` (``TokenWindows.weights``) instead of the ids.

  @property
  def shape(self) -> tuple[int, int]:
    return (self.windows.num_windows, self.windows.block_size)

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(np.float32 if self.mask else np.int32)

  def __len__(self) -> int:
    return self.windows.num_windows

  def __getitem__(self, index) -> np.ndarray:
    if isinstance(index, (int, np.integer)):  # One window: (T,).
      return self[np.asarray([index])][0]
    if isinstance(index, slice):
      rows = np.asarray(range(len(self))[index])
    else:
      rows = np.asarray(index)
      if rows.size and (rows.min() < -len(self) or rows.max() >= len(self)):
        raise IndexError(f"window index out of range [0, {len(self)})")
      rows = rows % len(self)
    ids = self.windows.gather(rows * self.windows.stride, self.shift)
    return self.windows.weights(rows, ids) if self.mask else ids


@dataclasses.dataclass(frozen=True)
class TokenWindows(Mapping):
  """Windows of ``block_size`` tokens of ``tokens`` (1-D integer array), every ``stride``-th.

  ``stride=1``: every window (training); ``stride=block_size``: consecutive non-overlapping
  windows covering the stream in order (evaluation; the last ``< stride`` tokens that do
  not fill a window are left out). ``len(self["x"]) == (len(tokens) - 1 - block_size) //
  stride + 1``. A third column ``mask`` (float32 weights of ``y``, ``weights``) exists with
  ``ignore_id`` or with ``score_once`` and overlapping windows:

  - ``ignore_id``: 0 where ``y`` is ``ignore_id``, leaving those targets out of the loss and
    metrics: the validation stream's document separators, so its perplexity is over the
    documents' own tokens.
  - ``score_once`` (evaluation with ``stride < block_size``, a sliding window): window ``i >
    0`` scores only its last ``stride`` targets, those the previous window did not, so each
    target is scored once and, after the first window, with at least ``block_size - stride``
    tokens of context (the sliding-window perplexity of Hugging Face's guide).
  """
  tokens: np.ndarray
  block_size: int
  stride: int = 1
  ignore_id: int | None = None
  score_once: bool = False

  def __post_init__(self):
    if self.block_size < 1 or self.stride < 1:
      raise ValueError(f"config key 'data.block_size': expected a positive int, got {self.block_size}")
    if self.score_once and self.stride > self.block_size:
      raise ValueError(f"config key 'data.eval_stride': expected 1 <= stride <= block_size "
                       f"({self.block_size}), got {self.stride}")
    if self.tokens.ndim != 1 or len(self.tokens) < self.block_size + 1:
      raise ValueError(f"config key 'data.block_size': a window of {self.block_size} tokens and "
                       f"its next token need {self.block_size + 1} tokens; the stream has "
                       f"{len(self.tokens)}")

  @property
  def columns(self) -> tuple[str, ...]:
    masked = self.ignore_id is not None or (self.score_once and self.stride < self.block_size)
    return ("x", "y", "mask") if masked else ("x", "y")

  def __len__(self) -> int:  # The number of columns, as a Mapping.
    return len(self.columns)

  def __iter__(self) -> Iterator[str]:
    return iter(self.columns)

  def __getitem__(self, key: str) -> _Column:
    if key not in self.columns:
      raise KeyError(key)
    return _Column(self, 0 if key == "x" else 1, key == "mask")

  @property
  def num_windows(self) -> int:
    return (len(self.tokens) - 1 - self.block_size) // self.stride + 1

  def at_first_targets(self, per_token: np.ndarray) -> np.ndarray:
    """``per_token[i * stride + 1]`` for every window ``i``, shape ``(num_windows,)``: an
    annotation of each token of the stream (``(len(tokens),)``, e.g. the source it came from)
    read at each window's first target."""
    per_token = np.asarray(per_token)
    if per_token.shape != self.tokens.shape:
      raise ValueError(f"a per-token annotation of the stream must have shape "
                       f"{self.tokens.shape}, got {per_token.shape}")
    return per_token[np.arange(self.num_windows) * self.stride + 1]

  def weights(self, rows: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """float32 ``(len(rows), block_size)``: the ``mask`` column of windows ``rows`` whose
    targets are ``targets`` (0 for ``ignore_id`` and, with ``score_once``, for the targets an
    earlier window scored; else 1)."""
    weights = np.ones(targets.shape, np.float32)
    if self.ignore_id is not None:
      weights *= targets != self.ignore_id
    if self.score_once:
      weights[np.asarray(rows) > 0, :self.block_size - self.stride] = 0.0
    return weights

  def gather(self, starts: np.ndarray, shift: int = 0) -> np.ndarray:
    """int32 ``(len(starts), block_size)``: ``tokens[s + shift : s + shift + block_size]`` per start."""
    return np.asarray(self.tokens[starts[:, None] + shift + np.arange(self.block_size)], np.int32)

  def sample_batch(self, seed: int, step: int, batch_size: int,
                   rows: slice = slice(None)) -> dict[str, np.ndarray]:
    """Training batch ``step``: ``{"x", "y"}`` int32 ``(batch_size, T)`` (``rows`` of it) at
    window starts uniform in ``[0, len(tokens) - T - 1]``, drawn from ``default_rng((seed, step))``."""
    high = len(self.tokens) - self.block_size
    starts = np.random.default_rng((seed, step)).integers(0, high, batch_size)[rows]
    batch = {"x": self.gather(starts, 0), "y": self.gather(starts, 1)}
    if self.ignore_id is not None:
      batch["mask"] = (batch["y"] != self.ignore_id).astype(np.float32)
    return batch



def token_stream(docs: Iterable[Sequence[int]], separator_id: int,
                 dtype: np.dtype | type = np.int32) -> np.ndarray:
  """1-D ``dtype``: each document's ids preceded by ``separator_id`` (so the model learns
  where documents start, as the NNLM sees ``<s>`` padding), all concatenated in order."""
  parts = [np.asarray([separator_id, *doc], dtype) for doc in docs]
  return np.concatenate(parts) if parts else np.zeros((0,), dtype)


# A split is a pytree of arrays to the training loop (``jax.tree.map(lambda v: v[:1], split)``):
# TokenWindows flattens to its two lazy columns; mapping over them gives a plain dict of arrays.
jax.tree_util.register_pytree_node(
    TokenWindows, lambda w: (tuple(w[k] for k in w.columns), w.columns),
    lambda columns, values: dict(zip(columns, values)))
