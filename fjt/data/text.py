"""Next-word prediction on the English docstrings of the Python standard library.

The corpus ships with the running interpreter, so no download is needed. Every
module, class and function docstring of ``sysconfig.get_paths()["stdlib"]``
(without test suites and site-packages) is lower-cased and split into word
tokens. Files go to the validation split by a hash of their relative path, so
no file is in both splits and the split is the same on every machine.
"""

from __future__ import annotations

import ast
import collections
import functools
import math
import os
import re
import sysconfig
import warnings
import zlib

import numpy as np

from fjt.data.dataset import Dataset, Sources
from fjt.data.windows import TokenWindows, token_stream

BOS, UNK = "<s>", "<unk>"
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def tokenize(text: str) -> tuple[str, ...]:
  """Lower-cased word tokens of ``text`` (letters, with an inner apostrophe: ``don't``)."""
  return tuple(_WORD.findall(text.lower()))


def _docstrings(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    source = f.read()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", SyntaxWarning)  # Old escape sequences in some modules.
    tree = ast.parse(source)
  return [doc for node in ast.walk(tree) if isinstance(node, _DOC_NODES)
          if (doc := ast.get_docstring(node))]


@functools.lru_cache(maxsize=2)
def stdlib_docstring_texts(root: str | None = None) -> tuple[tuple[str, tuple[str, ...]], ...]:
  """``((relative_path, (docstring, ...)), ...)``, the raw docstrings, in sorted path order."""
  root = root or sysconfig.get_paths()["stdlib"]
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
    for name in sorted(filenames):
      if not name.endswith(".py"):
        continue
      path = os.path.join(dirpath, name)
      try:
        docs = _docstrings(path)
      except (SyntaxError, UnicodeDecodeError, ValueError):
        continue  # A few files in the stdlib are deliberately not valid Python 3.
      if docs:
        files.append((os.path.relpath(path, root).replace(os.sep, "/"), tuple(docs)))
  if not files:
    raise FileNotFoundError(f"no docstrings found under the standard library at {root!r}")
  return tuple(files)


@functools.lru_cache(maxsize=2)
def stdlib_docstrings(root: str | None = None) -> tuple[tuple[str, tuple[tuple[str, ...], ...]], ...]:
  """``((relative_path, (docstring_tokens, ...)), ...)`` in sorted path order."""
  files = []
  for path, docs in stdlib_docstring_texts(root):
    tokens = tuple(t for d in docs if (t := tokenize(d)))
    if tokens:
      files.append((path, tokens))
  return tuple(files)


def file_hash(relative_path: str) -> int:
  return zlib.crc32(relative_path.encode()) % 100


def source_name(relative_path: str) -> str:
  """The source of a file for non-IID splits: its top-level package or module, the first
  component of ``relative_path`` (``email/mime/text.py`` -> ``email``), without its extension
  when that is the file itself (``os.py`` -> ``os``)."""
  first, _, rest = relative_path.partition("/")
  return first if rest else os.path.splitext(first)[0]


def is_validation_file(relative_path: str, validation_percent: int = 10) -> bool:
  return file_hash(relative_path) < validation_percent


def build_vocab(docs, vocab_size: int) -> dict[str, int]:
  """``{word: id}``: 0 is ``<s>`` (padding before a docstring), 1 is ``<unk>``,
  then the ``vocab_size - 2`` most frequent words (ties alphabetical)."""
  counts = collections.Counter(t for doc in docs for t in doc)
  words = sorted(counts, key=lambda w: (-counts[w], w))[:vocab_size - 2]
  return {w: i for i, w in enumerate([BOS, UNK] + words)}


def windows(docs, vocab: dict[str, int], context: int) -> tuple[np.ndarray, np.ndarray]:
  """Every token of every docstring with its ``context`` previous words.

  Returns x int32 ``(N, context)`` (left-padded with ``<s>``) and y int32 ``(N,)``.
  """
  xs, ys = [], []
  unk = vocab[UNK]
  for doc in docs:
    ids = np.array([vocab[BOS]] * context + [vocab.get(t, unk) for t in doc], np.int32)
    xs.append(np.lib.stride_tricks.sliding_window_view(ids[:-1], context))
    ys.append(ids[context:])
  return np.concatenate(xs).astype(np.int32), np.concatenate(ys)


def unigram_perplexity(train_y: np.ndarray, test_y: np.ndarray, vocab_size: int) -> float:
  """Perplexity on ``test_y`` of add-one-smoothed unigram frequencies of ``train_y``."""
  counts = np.bincount(train_y, minlength=vocab_size).astype(np.float64) + 1.0
  log_p = np.log(counts / counts.sum())
  return float(math.exp(-log_p[test_y].mean()))


def load(vocab_size: int = 5000, context: int = 4, validation_percent: int = 10,
         block_size: int = 0, eval_stride: int = 0, sources: tuple[str, ...] = ()) -> Dataset:
  """Windows of ``context`` words -> next word, split by source file; with ``block_size``,
  blocks of a token stream for a GPT (see ``window_dataset``); ``sources``: only these
  packages' files (``source_name``), in both splits, with the vocabulary of all of them."""
  return window_dataset(stdlib_docstrings(), vocab_size, context, validation_percent,
                        block_size=block_size, eval_stride=eval_stride, sources=sources)


def window_dataset(files, vocab_size: int, context: int, validation_percent: int,
                   is_validation=None, block_size: int = 0, source_of=source_name,
                   eval_stride: int = 0, sources: tuple[str, ...] = ()) -> Dataset:
  """The next-word dataset of ``files`` = ``((relative_path, (doc_tokens, ...)), ...)``: a file
  is in validation by ``is_validation(path)`` (default ``is_validation_file``); the vocabulary
  is ``build_vocab`` of the training documents; examples are ``windows``.

  With ``block_size > 0`` (a GPT's context; ``context`` is unused), the documents of each
  split become one token stream (each document preceded by ``<s>``) and the splits are
  ``TokenWindows`` of it: ``x``, ``y`` int32 ``(N, block_size)`` with ``y`` the next token of
  each position; training batches are random windows, evaluation the validation stream in
  consecutive windows, every ``eval_stride`` tokens (default ``block_size``; a smaller stride
  is a sliding window that scores each target once, ``TokenWindows.score_once``). The
  vocabulary and the file split are the same as for ``context`` windows, and
  ``info["tokenizer"]`` is the word vocabulary, so a run can decode samples.

  ``sources``: each training example's source, ``source_of(path)`` of its file (default
  ``source_name``, the top-level package); a block's source is that of its first target.

  ``sources`` (config key ``data.sources``): when given, both splits hold only the files of
  these sources, and the vocabulary is still that of all training files, so a model trained on
  every source and one fine-tuned on a few share their embedding rows (task vectors and merges
  compare). A name no file has is an error."""
  if is_validation is None:
    is_validation = lambda path: is_validation_file(path, validation_percent)
  train_files = [(path, docs) for path, docs in files if not is_validation(path)]
  vocab = build_vocab([d for _, docs in train_files for d in docs], vocab_size)
  if sources:
    known = {source_of(path) for path, _ in files}
    unknown = [s for s in sources if s not in known]
    if unknown:
      raise ValueError(f"data.sources: no file has source {unknown[0]!r}; known: "
                       f"{sorted(known)}")
    files = [(path, docs) for path, docs in files if source_of(path) in sources]
    train_files = [(path, docs) for path, docs in files if not is_validation(path)]
  train_docs = [d for _, docs in train_files for d in docs]
  names = sorted({source_of(path) for path, _ in train_files})
  index = {name: i for i, name in enumerate(names)}
  doc_sources = np.asarray([index[source_of(path)] for path, docs in train_files for _ in docs],
                           np.int32)
  test_docs = [d for path, docs in files if is_validation(path) for d in docs]
  if block_size:
    # Validation scores the docstrings' own words, as the NNLM's windows do: predicting a
    # separator <s> (where the next docstring starts) is left out of its metrics.
    train = TokenWindows(token_stream(_ids(train_docs, vocab), vocab[BOS]), block_size)
    test = TokenWindows(token_stream(_ids(test_docs, vocab), vocab[BOS]), block_size,
                        eval_stride or block_size, vocab[BOS], score_once=True)
    y_train, y_test = (t[1:][t[1:] != vocab[BOS]] for t in (train.tokens, test.tokens))
    # Each document's tokens and the <s> before it come from its file.
    source_ids = train.at_first_targets(np.repeat(doc_sources, [len(d) + 1 for d in train_docs]))
  else:
    x_train, y_train = windows(train_docs, vocab, context)
    source_ids = np.repeat(doc_sources, [len(d) for d in train_docs])  # A window per token.
    x_test, y_test = windows(test_docs, vocab, context)
    train, test = {"x": x_train, "y": y_train}, {"x": x_test, "y": y_test}
  info = {
      "vocab_size": len(vocab),
      "train_tokens": int(len(y_train)),
      "validation_tokens": int(len(y_test)),
      "word_types": len({t for d in train_docs + test_docs for t in d}),
      "unigram_perplexity": unigram_perplexity(y_train, y_test, len(vocab)),
      "task": "language_model",
      "vocab": sorted(vocab, key=vocab.__getitem__),  # Words in id order: row i of the embedding.
  }
  # The model's output width is the vocabulary size asked for, even where a small corpus has
  # fewer words (those ids never occur).
  if block_size:
    info["tokenizer"] = {"type": "word", "vocab": info["vocab"]}
  return Dataset(train=train, test=test, num_classes=max(len(vocab), vocab_size), info=info,
                 sources=Sources(source_ids, tuple(names)))


def _ids(docs, vocab: dict[str, int]) -> list[list[int]]:
  unk = vocab[UNK]
  return [[vocab.get(t, unk) for t in doc] for doc in docs]
