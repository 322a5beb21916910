"""Tokenizers of the language-model data: fjt's word vocabulary and a locally trained BPE.

Both have ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size`` and
``to_json() -> str``; ``load_tokenizer`` reads either back from that JSON (a file path or the
parsed object), so a run can decode with the tokenizer its data was made with.
"""

from __future__ import annotations

import json
import os
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


def load_tokenizer(spec: str | os.PathLike | Mapping) -> Tokenizer:
  """The tokenizer saved by ``to_json``: a path to that file, or its parsed JSON object."""
  if not isinstance(spec, Mapping):
    try:
      with open(spec, encoding="utf-8") as f:
        spec = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"tokenizer file {os.fspath(spec)!r} cannot be read: {e}") from e
  if spec.get("type") == "word":
    return WordTokenizer(spec["vocab"])
  if "model" in spec:  # The tokenizers library's own format.
    return BPETokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)))
  raise ValueError(f"not a tokenizer: expected a word vocabulary ({{'type': 'word', ...}}) or a "
                   f"tokenizers JSON; got keys {sorted(spec)[:5]}")
