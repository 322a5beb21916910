"""Word vectors: rows of an ``nn.Embed`` table looked up by word, and nearest neighbours by cosine
similarity. Pure functions of arrays and a vocabulary; ``fjt.runs.run_vocabulary`` gives a run's
vocabulary and ``scripts/embeddings.py`` prints them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fjt.tree import flatten, to_nested_dict, unbox

PyTree = Any


@dataclasses.dataclass(frozen=True)
class WordVector:
  """A word's row of an embedding table; ``index`` and ``vector`` are None (and ``neighbors``
  empty) for a word not in the vocabulary. ``neighbors``: ``(word, cosine similarity)``, most
  similar first, the word itself left out."""
  word: str
  index: int | None
  vector: np.ndarray | None
  neighbors: tuple[tuple[str, float], ...] = ()


def vocab_words(vocab: Sequence[str] | Mapping[str, int]) -> list[str]:
  """The words in id order, from a word list or a ``{word: id}`` with ids ``0 .. n-1``."""
  if not isinstance(vocab, Mapping):
    return list(vocab)
  words = sorted(vocab, key=vocab.__getitem__)
  if [vocab[w] for w in words] != list(range(len(words))):
    raise ValueError(f"vocabulary ids are not 0 .. {len(words) - 1}")
  return words


def embedding_table(variables: PyTree, vocab_size: int | None = None,
                    path: str | None = None) -> tuple[str, np.ndarray]:
  """``(path, table (rows, dim))`` of an ``nn.Embed`` in ``variables``.

  ``path`` ('/'-joined, e.g. ``params/wte/embedding``) picks the table; by default it is the one
  2-D ``.../embedding`` leaf, or the one with ``vocab_size`` rows (else the one with more rows)
  when there are several (GPT's ``wte`` beside ``wpe``).
  """
  flat = flatten(to_nested_dict(unbox(variables)))  # unbox: model.init's logical-axis boxes.
  tables = {p: v for p, v in flat.items() if p.rsplit("/", 1)[-1] == "embedding" and np.ndim(v) == 2}
  if path is None:
    candidates = list(tables)
    if vocab_size is not None and len(candidates) > 1:
      candidates = ([p for p in tables if tables[p].shape[0] == vocab_size] or
                    [p for p in tables if tables[p].shape[0] > vocab_size])
    if len(candidates) != 1:
      found = ", ".join(f"{p} {tuple(v.shape)}" for p, v in tables.items()) or "none"
      raise ValueError(f"cannot tell the word embedding table for a vocabulary of {vocab_size} "
                       f"words; 2-D '.../embedding' leaves: {found}; pass its path")
    path = candidates[0]
  if path not in flat:
    raise ValueError(f"no leaf {path!r} in the variables; embedding tables: {sorted(tables) or 'none'}")
  table = np.asarray(flat[path])
  if table.ndim != 2:
    raise ValueError(f"{path} has shape {table.shape}, expected (vocab, dim)")
  if vocab_size is not None and table.shape[0] < vocab_size:
    raise ValueError(f"{path} has {table.shape[0]} rows, fewer than the {vocab_size} words of the vocabulary")
  return path, table


def nearest(table: np.ndarray, index: int, k: int) -> list[tuple[int, float]]:
  """The ``k`` rows of ``table`` most cosine-similar to row ``index`` (itself left out), as
  ``(row, cos)``, most similar first, ties to the lower row. ``cos(a, b) = a.b / (|a| |b|)``
  in float64; a zero row has cosine 0 with everything."""
  table = np.asarray(table, np.float64)
  norms = np.linalg.norm(table, axis=1)
  dots = table @ table[index]
  denom = norms * norms[index]
  cos = np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0)
  order = [int(i) for i in np.lexsort((np.arange(len(cos)), -cos)) if i != index]
  return [(i, float(cos[i])) for i in order[:k]]


def embedding(variables: PyTree, vocab: Sequence[str] | Mapping[str, int], words: Sequence[str],
              neighbors: int = 0, path: str | None = None) -> list[WordVector]:
  """The embedding vector of each word and its ``neighbors`` nearest words by cosine similarity.

  ``vocab`` is the word list in id order (a dataset's ``info["vocab"]``) or ``{word: id}``;
  ``path`` as ``embedding_table``'s. A word not in ``vocab`` comes back with ``index=None``:
  never the ``<unk>`` row.
  """
  vocab = vocab_words(vocab)
  _, table = embedding_table(variables, len(vocab), path)
  ids = {w: i for i, w in enumerate(vocab)}
  out = []
  for word in words:
    i = ids.get(word)
    if i is None:
      out.append(WordVector(word, None, None))
      continue
    near = tuple((vocab[j], c) for j, c in nearest(table[:len(vocab)], i, neighbors)) if neighbors else ()
    out.append(WordVector(word, i, table[i], near))
  return out
