"""Token files: a user's text made into ``train.bin`` / ``val.bin``, read by memory map.

A token directory (written by ``prepare_text``, i.e. ``scripts/prepare_text.py``) holds

  train.bin, val.bin   the token ids of each split, one stream, ``meta["dtype"]`` (uint16 when
                       the vocabulary fits, else uint32), no header (nanoGPT's format)
  tokenizer.json       the tokenizer (``fjt.data.tokenizer.load_tokenizer`` reads it)
  meta.json            ``{"dtype", "vocab_size", "tokenizer", "train_tokens",
                       "validation_tokens", "unigram_perplexity", "sources"}``

Each document (a text file, or a docstring of the standard-library corpus) is preceded by the
tokenizer's separator id.

nanoGPT's folders read as they are: ``train.bin`` / ``val.bin`` with its ``meta.pkl``
(``vocab_size``, ``itos`` / ``stoi``: read as plain data, never unpickling objects; its files are
uint16 unless ``data.dtype`` says otherwise), or with no meta file at all when ``data.vocab_size``
and ``data.dtype`` are given (no dtype is ever guessed). Every id is checked against the
vocabulary when the files are opened (``check_token_ids``). ``load`` (dataset ``"tokens"``) maps the files with ``np.memmap``; a
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
from fjt.data.tokenizer import Tokenizer, WordTokenizer, read_pickle_meta, train_bpe
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
                 vocab_size: int = 5000, validation_percent: int = 10,
                 vocab: Sequence[str] | None = None) -> dict:
  """Writes the token directory ``out_dir`` from the text files of ``sources`` (files or
  folders; none: the standard-library docstring corpus). The tokenizer is built on the
  training texts only, unless ``vocab`` (words in id order, e.g. another run's:
  ``fjt.runs.run_vocabulary``) gives a word tokenizer, so a trained model reads the new text
  with the ids it knows. Returns the ``meta.json`` it wrote."""
  check_vocab_size(tokenizer, vocab_size)  # Before the corpus is read.
  train_texts, val_texts = _split_documents(sources, validation_percent)
  tok = (WordTokenizer(list(vocab)) if vocab is not None else
         build_tokenizer(tokenizer, train_texts, vocab_size))
  tokenizer = "word" if vocab is not None else tokenizer
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


_DTYPES = ("uint8", "uint16", "uint32", "int32", "int64")
NANOGPT_DTYPE = "uint16"  # What nanoGPT's prepare.py scripts write (meta.pkl does not say).


def read_meta(path: str, vocab_size: int = 0, dtype: str = "") -> dict:
  """The meta of token directory ``path``: ``{"dtype", "vocab_size", ...}`` of fjt's
  ``meta.json``, of nanoGPT's ``meta.pkl`` (dtype uint16) or, with neither, of ``vocab_size``
  and ``dtype`` (``data.vocab_size`` / ``data.dtype``, which also override a meta file's).
  ``"dtype_from"`` says where the dtype came from; ``"tokenizer"`` is the file to decode with."""
  json_path, pkl_path = os.path.join(path, "meta.json"), os.path.join(path, "meta.pkl")
  if os.path.isfile(json_path):
    try:
      with open(json_path, encoding="utf-8") as f:
        meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"config key 'data.path': cannot read {json_path!r} ({e}); make the "
                       "directory with scripts/prepare_text.py") from e
    meta = {**meta, "dtype_from": f"{json_path}'s dtype"}
    if "dtype" not in meta and not dtype:
      raise ValueError(f"{json_path!r} has no 'dtype' and config key 'data.dtype' is not set: "
                       f"the token files' dtype cannot be known (one of {', '.join(_DTYPES)})")
  elif os.path.isfile(pkl_path):
    pkl = read_pickle_meta(pkl_path)
    meta = {"vocab_size": pkl["vocab_size"], "dtype": NANOGPT_DTYPE, "tokenizer": "meta.pkl",
            "dtype_from": f"nanoGPT's {NANOGPT_DTYPE}, as meta.pkl does not say"}
  elif vocab_size and dtype:
    meta = {}
  else:
    raise ValueError(f"config key 'data.path': {path!r} has no meta.json (scripts/prepare_text.py) "
                     f"or meta.pkl (nanoGPT); without one set data.vocab_size and data.dtype "
                     f"(nanoGPT writes uint16), the dtype is never guessed")
  if vocab_size:
    meta["vocab_size"] = int(vocab_size)
  if dtype:
    meta.update(dtype=dtype, dtype_from="config key 'data.dtype'")
  if str(meta.get("dtype")) not in _DTYPES:
    raise ValueError(f"{meta.get('dtype_from', 'config key data.dtype')}: token dtype "
                     f"{meta.get('dtype')!r} is not one of {', '.join(_DTYPES)}")
  return meta


def memmap_split(path: str, split: str, meta: dict) -> np.memmap:
  """The read-only ``np.memmap`` of ``split`` ("train" | "validation") of token directory
  ``path``, every id checked against ``meta["vocab_size"]``."""
  file = os.path.join(path, _SPLIT_FILES[split])
  if not os.path.isfile(file):
    raise ValueError(f"config key 'data.path': token file {file!r} does not exist")
  dtype = np.dtype(meta["dtype"])
  if os.path.getsize(file) % dtype.itemsize:
    raise ValueError(f"token file {file!r}: {os.path.getsize(file)} bytes is not a whole number "
                     f"of {dtype.name} tokens ({meta.get('dtype_from', 'the dtype')})")
  tokens = np.memmap(file, dtype=dtype, mode="r")
  check_token_ids(tokens, int(meta["vocab_size"]), file)
  return tokens


def check_token_ids(tokens: np.ndarray, vocab_size: int, file: str,
                    chunk: int = 1 << 24) -> None:
  """Raises ValueError (one line naming the id, its position, the vocabulary and ``file``) if
  an id of the 1-D ``tokens`` is negative or ``>= vocab_size``: an embedding would read such an
  id as NaN. Reads ``tokens`` once, ``chunk`` ids at a time; a memmap's file by plain reads, so
  its pages do not stay mapped into the process."""
  mapped = isinstance(tokens, np.memmap) and tokens.filename is not None
  for start in range(0, len(tokens), chunk):
    part = (np.fromfile(tokens.filename, tokens.dtype, count=min(chunk, len(tokens) - start),
                        offset=tokens.offset + start * tokens.dtype.itemsize)
            if mapped else np.asarray(tokens[start:start + chunk]))
    bad = (part >= vocab_size) | (part < 0) if part.dtype.kind == "i" else part >= vocab_size
    if bad.any():
      at = int(np.argmax(bad))
      raise ValueError(f"token file {file!r}: id {int(part[at])} at position {start + at} is "
                       f"outside the vocabulary of {vocab_size} tokens (ids 0 .. {vocab_size - 1})")


def load(path: str, block_size: int = 128, eval_stride: int = 0, vocab_size: int = 0,
         dtype: str = "") -> Dataset:
  """Dataset ``"tokens"``: windows of ``block_size`` tokens of the token directory ``path``.

  ``train``: random windows of ``train.bin`` (``TokenWindows.sample_batch``); ``test``:
  ``val.bin`` in windows every ``eval_stride`` tokens (default ``block_size``: consecutive;
  smaller: a sliding window scoring each token once), in order. Neither file is read whole.
  ``info`` has the ``meta.json`` counts, ``"tokenizer"`` (the tokenizer file's path: nanoGPT's
  ``meta.pkl`` for its folders) and ``"task"``. ``vocab_size`` and ``dtype``: for a folder
  without meta file (see ``read_meta``).
  """
  if not path:
    raise ValueError("config key 'data.path': the token directory is required")
  meta = read_meta(path, vocab_size, dtype)
  train = TokenWindows(memmap_split(path, "train", meta), block_size, 1)
  test = TokenWindows(memmap_split(path, "validation", meta), block_size,
                      eval_stride or block_size, score_once=True)
  info = {
      "vocab_size": int(meta["vocab_size"]),
      "train_tokens": len(train.tokens),
      "validation_tokens": len(test.tokens),
      "tokenizer": os.path.join(os.path.abspath(path), meta.get("tokenizer", "tokenizer.json")),
      "task": "language_model",
  }
  if "unigram_perplexity" in meta:  # prepare_text's; nanoGPT's folders have none (never a NaN).
    info["unigram_perplexity"] = float(meta["unigram_perplexity"])
  return Dataset(train=train, test=test, num_classes=int(meta["vocab_size"]), info=info)
