"""Tokenizers of the language-model data: fjt's word vocabulary and a locally trained BPE.

Both have ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size`` and
``to_json() -> str``; ``load_tokenizer`` reads either back from that JSON (a file path or the
parsed object), so a run can decode with the tokenizer its data was made with.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import tokenizers

from fjt.data.text import BOS, UNK, tokenize

BPE_END = "<|endoftext|>"  # GPT-2's document separator, the BPE's only special token.


class Tokenizer(Protocol):
  vocab_size: int
  separator_id: int  # Put before every document of a token stream.

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...

  def to_json(self) -> str: ...


class WordTokenizer:
  """Lower-cased words (``fjt.data.text.tokenize``) -> ids of ``vocab`` (a list of words,
  id = position; ``<s>`` is 0, ``<unk>`` 1, as ``fjt.data.text.build_vocab`` makes them)."""

  def __init__(self, vocab: Sequence[str]):
    if list(vocab[:2]) != [BOS, UNK]:
      raise ValueError(f"word vocabulary must start with {BOS!r}, {UNK!r}; got {list(vocab[:2])}")
    self.vocab = list(vocab)
    self.ids = {w: i for i, w in enumerate(self.vocab)}
    self.vocab_size = len(self.vocab)
    self.separator_id = self.ids[BOS]

  def encode(self, text: str) -> list[int]:
    unk = self.ids[UNK]
    return [self.ids.get(t, unk) for t in tokenize(text)]

  def decode(self, ids: Sequence[int]) -> str:
    # Ids past the vocabulary (a model wider than a small corpus's vocabulary) read as <unk>.
    return " ".join("\n" if i == self.separator_id else
                    self.vocab[i] if i < self.vocab_size else UNK for i in ids)

  def to_json(self) -> str:
    return json.dumps({"type": "word", "vocab": self.vocab})


class BPETokenizer:
  """A byte-level BPE (GPT-2's scheme) of the ``tokenizers`` library."""

  def __init__(self, tokenizer: tokenizers.Tokenizer):
    self.tokenizer = tokenizer
    self.vocab_size = tokenizer.get_vocab_size()
    self.separator_id = tokenizer.token_to_id(BPE_END)
    if self.separator_id is None:
      raise ValueError(f"BPE tokenizer has no {BPE_END!r} token")

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self.tokenizer.decode(list(ids), skip_special_tokens=False)

  def to_json(self) -> str:
    return self.tokenizer.to_str()


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
  """A byte-level BPE of ``vocab_size`` tokens (256 bytes, ``<|endoftext|>``, merges) trained
  on ``texts`` on this machine; any text encodes (no unknown tokens)."""
  if vocab_size < 258:
    raise ValueError(f"--vocab_size: a byte-level BPE needs at least 258 tokens, got {vocab_size}")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[BPE_END], show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer)
  return BPETokenizer(tok)


class CharTokenizer:
  """nanoGPT's character vocabulary (``meta.pkl``'s ``stoi`` / ``itos``): one id per character.
  It has no document separator (``separator_id`` is None)."""

  def __init__(self, itos: Mapping[int, str], source: str = "meta.pkl"):
    self.itos = {int(i): str(c) for i, c in itos.items()}
    self.stoi = {c: i for i, c in self.itos.items()}
    self.vocab_size = max(self.itos, default=-1) + 1
    self.separator_id = None
    self.source = source

  def encode(self, text: str) -> list[int]:
    unknown = next((c for c in text if c not in self.stoi), None)
    if unknown is not None:
      raise ValueError(f"{self.source}: character {unknown!r} is not in the vocabulary of "
                       f"{len(self.stoi)} characters")
    return [self.stoi[c] for c in text]

  def decode(self, ids: Sequence[int]) -> str:
    return "".join(self.itos.get(int(i), "") for i in ids)

  def to_json(self) -> str:
    return json.dumps({"type": "char", "itos": {str(i): c for i, c in self.itos.items()}})


class _PlainUnpickler(pickle.Unpickler):
  """Unpickles plain data only (dicts, lists, strings, numbers): any class or function a
  pickle names is refused, so a ``meta.pkl`` cannot run code."""
  ALLOWED = {("builtins", name) for name in ("dict", "list", "str", "int", "float", "tuple")}

  def find_class(self, module: str, name: str):
    if (module, name) in self.ALLOWED:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f"it names {module}.{name}; only plain dicts, lists, strings "
                                 f"and numbers are read (unpickling objects can run code)")


def read_pickle_meta(path: str | os.PathLike) -> dict:
  """nanoGPT's ``meta.pkl`` (``{"vocab_size", "itos", "stoi"}``), read as plain data only."""
  try:
    with open(path, "rb") as f:
      meta = _PlainUnpickler(io.BytesIO(f.read())).load()
  except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
    raise ValueError(f"{os.fspath(path)!r} cannot be read as nanoGPT's meta.pkl: {e}") from e
  if not isinstance(meta, dict) or not isinstance(meta.get("vocab_size"), int):
    raise ValueError(f"{os.fspath(path)!r}: expected nanoGPT's meta.pkl, a dict with an int "
                     f"'vocab_size' (and 'itos' / 'stoi')")
  return meta


def load_tokenizer(spec: str | os.PathLike | Mapping) -> Tokenizer:
  """The tokenizer saved by ``to_json`` (a path to that file, or its parsed JSON object), or
  the character vocabulary of nanoGPT's ``meta.pkl`` (a path ending in ``.pkl``)."""
  if not isinstance(spec, Mapping) and os.fspath(spec).endswith(".pkl"):
    meta = read_pickle_meta(spec)
    if not isinstance(meta.get("itos"), dict):
      raise ValueError(f"{os.fspath(spec)!r}: meta.pkl has no 'itos' (id -> character) to decode with")
    return CharTokenizer(meta["itos"], os.fspath(spec))
  if not isinstance(spec, Mapping):
    try:
      with open(spec, encoding="utf-8") as f:
        spec = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"tokenizer file {os.fspath(spec)!r} cannot be read: {e}") from e
  if spec.get("type") == "word":
    return WordTokenizer(spec["vocab"])
  if spec.get("type") == "char":
    return CharTokenizer(spec["itos"])
  if "model" in spec:  # The tokenizers library's own format.
    return BPETokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)))
  raise ValueError(f"not a tokenizer: expected a word vocabulary ({{'type': 'word', ...}}) or a "
                   f"tokenizers JSON; got keys {sorted(spec)[:5]}")
