"""Token files: a user's text made into ``train.bin`` / ``val.bin``, read by memory map.

A token directory (written by ``prepare_text``, i.e. ``scripts/prepare_text.py``) holds

  train.bin, val.bin   the token ids of each split, one stream, ``meta["dtype"]`` (uint16 when
                       the vocabulary fits, else uint32), no header (nanoGPT's format)
  tokenizer.json       the tokenizer (``fjt.data.tokenizer.load_tokenizer`` reads it)
  meta.json            ``{"dtype", "vocab_size", "tokenizer", "train_tokens",
                       "validation_tokens", "unigram_perplexity", "sources"}``

Each document (a text file, or a docstring of the standard-library corpus) is preceded by the
tokenizer's separator id. ``load`` (dataset ``"tokens"``) maps the files with ``np.memmap``; a
batch reads only its windows (``fjt.data.windows.TokenWindows``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from fjt.data import text
from fjt.data.dataset import Dataset
from fjt.data.text_files import find_files
from fjt.data.tokenizer import Tokenizer, WordTokenizer, train_bpe
from fjt.data.windows import TokenWindows, token_stream
from fjt.files import sync_directory, write_atomic

TOKENIZERS = ("word", "bpe")
_SPLIT_FILES = {"train": "train.bin", "validation": "val.bin"}


def _read_sources(sources: Sequence[str]) -> list[tuple[str, str]]:
  """``[(path, text)]`` of the files of ``sources`` (``fjt.data.text_files.find_files``: files,
  folders searched for text files, globs), in sorted order."""
  documents = []
  for _, path in find_files(sources):
    try:
      with open(path, encoding="utf-8") as f:
        documents.append((path, f.read()))
    except UnicodeDecodeError as e:
      raise ValueError(f"source file {path!r} is not UTF-8 text: {e}") from e
    if "\0" in documents[-1][1]:
      raise ValueError(f"source file {path!r} holds NUL bytes: not a text file")
  return documents


def _split_documents(sources: Sequence[str], validation_percent: int
                     ) -> tuple[list[str], list[str]]:
  """(train texts, validation texts). The standard-library corpus (no ``sources``) splits by
  file as ``fjt.data.text`` does; the user's files give their last ``validation_percent``
  percent of characters (whole lines) to validation, so any one file suffices."""
  if not sources:
    files = text.stdlib_docstring_texts()
    split = [text.is_validation_file(path, validation_percent) for path, _ in files]
    return ([d for (_, docs), v in zip(files, split) if not v for d in docs],
            [d for (_, docs), v in zip(files, split) if v for d in docs])
  documents = [t for _, t in _read_sources(sources)]
  joined = "".join(documents)
  cut = len(joined) * (100 - validation_percent) // 100
  # At a line break if there is one, else after a space: never inside a word.
  cut = joined.rfind("\n", 0, cut) + 1 or max(joined.rfind(" ", 0, cut), joined.rfind("\t", 0, cut)) + 1
  train, val, offset = [], [], 0
  for doc in documents:
    head, tail = doc[:max(0, cut - offset)], doc[max(0, cut - offset):]
    train += [head] if head else []
    val += [tail] if tail else []
    offset += len(doc)
  if not train or not val:
    raise ValueError(f"sources {list(sources)}: too little text to split off "
                     f"{validation_percent}% for validation")
  return train, val


# The smallest vocabulary of each tokenizer: its special tokens plus one word (``<s>``, ``<unk>``),
# or its 256 bytes plus ``<|endoftext|>``.
MIN_VOCAB_SIZE = {"word": 3, "bpe": 257}


def check_vocab_size(kind: str, vocab_size: int) -> None:
  """A vocabulary size below the tokenizer's ``MIN_VOCAB_SIZE`` is an error naming the flag."""
  if kind in MIN_VOCAB_SIZE and not (isinstance(vocab_size, int) and
                                     vocab_size >= MIN_VOCAB_SIZE[kind]):
    raise ValueError(f"--vocab_size: a {kind} tokenizer needs at least {MIN_VOCAB_SIZE[kind]} "
                     f"tokens (its special tokens and more), got {vocab_size!r}")


def build_tokenizer(kind: str, texts: Sequence[str], vocab_size: int) -> Tokenizer:
  """``word``: the ``vocab_size - 2`` most frequent words of ``texts`` (``fjt.data.text``'s
  vocabulary); ``bpe``: a byte-level BPE of ``vocab_size`` tokens trained on ``texts``."""
  check_vocab_size(kind, vocab_size)
  if kind == "word":
    vocab = text.build_vocab([text.tokenize(t) for t in texts], vocab_size)
    return WordTokenizer(list(vocab))
  if kind == "bpe":
    return train_bpe(texts, vocab_size)
  raise ValueError(f"--tokenizer: expected one of {TOKENIZERS}, got {kind!r}")


def prepare_text(sources: Sequence[str], out_dir: str, tokenizer: str = "word",
                 vocab_size: int = 5000, validation_percent: int = 10) -> dict:
  """Writes the token directory ``out_dir`` from the text files of ``sources`` (files or
  folders; none: the standard-library docstring corpus). The tokenizer is built on the
  training texts only. Returns the ``meta.json`` it wrote."""
  check_vocab_size(tokenizer, vocab_size)  # Before the corpus is read.
  train_texts, val_texts = _split_documents(sources, validation_percent)
  tok = build_tokenizer(tokenizer, train_texts, vocab_size)
  dtype = np.uint16 if tok.vocab_size <= 2 ** 16 else np.uint32
  streams = {split: token_stream((tok.encode(t) for t in texts), tok.separator_id, dtype)
             for split, texts in (("train", train_texts), ("validation", val_texts))}
  meta = {
      "dtype": np.dtype(dtype).name,
      "vocab_size": tok.vocab_size,
      "tokenizer": "tokenizer.json",
      "tokenizer_kind": tokenizer,
      "train_tokens": int(len(streams["train"])),
      "validation_tokens": int(len(streams["validation"])),
      "unigram_perplexity": text.unigram_perplexity(
          streams["train"][1:], streams["validation"][1:], tok.vocab_size),
      "sources": [os.path.abspath(s) for s in sources] or ["<standard library docstrings>"],
  }
  files = {_SPLIT_FILES[split]: stream.tofile for split, stream in streams.items()}
  files.update({"tokenizer.json": tok.to_json(), "meta.json": json.dumps(meta, indent=2)})
  _write_all(out_dir, files)
  return meta


def _write_all(out_dir: str, files: dict) -> None:
  """Writes every file (name -> ``fjt.files.write_atomic`` data) into a staging folder in
  ``out_dir`` first, then renames them into place, ``meta.json`` last: a failure (a full disk)
  leaves ``out_dir``'s files as they were and nothing partial."""
  os.makedirs(out_dir, exist_ok=True)
  stage = os.path.join(out_dir, f".prepare-{os.getpid()}")
  os.makedirs(stage, exist_ok=True)
  try:
    for name, data in files.items():
      write_atomic(os.path.join(stage, name), data)
    for name in sorted(files, key=lambda n: n == "meta.json"):
      os.replace(os.path.join(stage, name), os.path.join(out_dir, name))
  finally:
    for name in os.listdir(stage):
      os.remove(os.path.join(stage, name))
    os.rmdir(stage)
  sync_directory(out_dir)


def read_meta(path: str) -> dict:
  meta_path = os.path.join(path, "meta.json")
  try:
    with open(meta_path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"config key 'data.path': cannot read {meta_path!r} ({e}); make the "
                     "directory with scripts/prepare_text.py") from e


def memmap_split(path: str, split: str, meta: dict) -> np.memmap:
  """The read-only ``np.memmap`` of ``split`` ("train" | "validation") of token directory ``path``."""
  file = os.path.join(path, _SPLIT_FILES[split])
  if not os.path.isfile(file):
    raise ValueError(f"config key 'data.path': token file {file!r} does not exist")
  dtype = np.dtype(meta.get("dtype", "uint16"))
  if os.path.getsize(file) % dtype.itemsize:
    raise ValueError(f"token file {file!r}: {os.path.getsize(file)} bytes is not a whole number "
                     f"of {dtype.name} tokens (meta.json's dtype)")
  return np.memmap(file, dtype=dtype, mode="r")


def load(path: str, block_size: int = 128, eval_stride: int = 0) -> Dataset:
  """Dataset ``"tokens"``: windows of ``block_size`` tokens of the token directory ``path``.

  ``train``: random windows of ``train.bin`` (``TokenWindows.sample_batch``); ``test``:
  ``val.bin`` in windows every ``eval_stride`` tokens (default ``block_size``: consecutive;
  smaller: a sliding window scoring each token once), in order. Neither file is read whole.
  ``info`` has the ``meta.json`` counts, ``"tokenizer"`` (the tokenizer file's path) and
  ``"task"``.
  """
  if not path:
    raise ValueError("config key 'data.path': the token directory is required")
  meta = read_meta(path)
  train = TokenWindows(memmap_split(path, "train", meta), block_size, 1)
  test = TokenWindows(memmap_split(path, "validation", meta), block_size,
                      eval_stride or block_size, score_once=True)
  info = {
      "vocab_size": int(meta["vocab_size"]),
      "train_tokens": len(train.tokens),
      "validation_tokens": len(test.tokens),
      "unigram_perplexity": float(meta.get("unigram_perplexity", float("nan"))),
      "tokenizer": os.path.join(os.path.abspath(path), meta.get("tokenizer", "tokenizer.json")),
      "task": "language_model",
  }
  return Dataset(train=train, test=test, num_classes=int(meta["vocab_size"]), info=info)
