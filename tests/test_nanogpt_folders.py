"""nanoGPT data folders as token data (issue 24): meta.pkl, no meta at all, ids and dtypes checked."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

import fjt
from fjt.config import ConfigError
from fjt.data import load_dataset
from fjt.data.tokens import check_token_ids
from scripts import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "the cat sat on the mat.\nthe dog sat on the log.\n" * 40


def char_folder(path, dtype=np.uint16, meta=True):
  """What nanoGPT's data/shakespeare_char/prepare.py writes: train.bin / val.bin of character
  ids and meta.pkl with vocab_size, itos and stoi."""
  os.makedirs(path, exist_ok=True)
  chars = sorted(set(TEXT))
  stoi = {c: i for i, c in enumerate(chars)}
  ids = np.array([stoi[c] for c in TEXT], dtype)
  cut = int(0.9 * len(ids))
  ids[:cut].tofile(os.path.join(path, "train.bin"))
  ids[cut:].tofile(os.path.join(path, "val.bin"))
  if meta:
    with open(os.path.join(path, "meta.pkl"), "wb") as f:
      pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
  return len(chars)


def test_train_on_a_nanogpt_char_folder_then_sample(tmp_path, capsys):
  vocab = char_folder(tmp_path / "shakespeare_char")
  config = fjt.load_config(os.path.join(ROOT, "configs", "text_gpt.py"))
  config = fjt.apply_overrides(config, [
      "data.name=tokens", f"data.path={tmp_path / 'shakespeare_char'}", "data.block_size=16",
      f"model.vocab_size={vocab}", "model.block_size=32", "model.embed_dim=16",
      "model.num_heads=2", "train.steps=4", "train.eval_every=4", "train.log_every=2",
      "checkpoint.every_steps=4", "optimizer.warmup_steps=1"])
  summary = fjt.train_and_evaluate(config, str(tmp_path / "run"), progress=False)
  assert summary["step"] == 4 and 1 < summary["eval"]["perplexity"] < 2 * vocab
  assert all(np.isfinite(v) for v in summary["eval"].values())  # No unigram baseline: no NaN.
  capsys.readouterr()
  assert sample.main([str(tmp_path / "run"), "--prompt", "the cat", "--tokens", "10"]) == 0
  out = capsys.readouterr().out[:-1]
  assert out.startswith("the cat") and len(out) == len("the cat") + 10
  assert set(out) <= set(TEXT)  # Decoded by meta.pkl's itos, one character per id.
  assert sample.main([str(tmp_path / "run"), "--prompt", "Zebra", "--tokens", "5"]) == 2
  assert "character 'Z' is not in the vocabulary" in capsys.readouterr().err


def test_without_meta_vocab_size_and_dtype_are_required(tmp_path):
  vocab = char_folder(tmp_path, np.uint32, meta=False)
  with pytest.raises(ConfigError, match=r"no meta.json .* or meta.pkl .*data.dtype"):
    load_dataset({"name": "tokens", "path": str(tmp_path), "block_size": 8})
  dataset = load_dataset({"name": "tokens", "path": str(tmp_path), "block_size": 8,
                          "vocab_size": vocab, "dtype": "uint32"})
  assert dataset.num_classes == vocab and dataset.info["train_tokens"] == int(0.9 * len(TEXT))
  assert int(dataset.train.tokens.max()) == vocab - 1
  # The same uint32 file read as uint16 is caught by its ids, not trained on.
  with pytest.raises(ConfigError) as error:
    load_dataset({"name": "tokens", "path": str(tmp_path), "block_size": 8, "vocab_size": vocab,
                  "dtype": "float16"})
  assert "'float16' is not one of" in str(error.value) and "\n" not in str(error.value)


def test_out_of_range_ids_and_bad_sizes_are_one_line_each(tmp_path):
  vocab = char_folder(tmp_path)
  ids = np.fromfile(tmp_path / "val.bin", np.uint16)
  ids[7] = vocab + 3
  ids.tofile(tmp_path / "val.bin")
  with pytest.raises(ConfigError) as error:
    load_dataset({"name": "tokens", "path": str(tmp_path), "block_size": 8})
  message = str(error.value)
  assert f"id {vocab + 3} at position 7 is outside the vocabulary of {vocab} tokens" in message
  assert "val.bin" in message and "\n" not in message
  with open(tmp_path / "val.bin", "ab") as f:
    f.write(b"\x00")  # 2k + 1 bytes: not whole uint16 tokens.
  with pytest.raises(ConfigError, match=r"not a whole number of uint16 tokens \(nanoGPT's uint16"):
    load_dataset({"name": "tokens", "path": str(tmp_path), "block_size": 8})
  with pytest.raises(ValueError, match=r"id -1 at position 2 .* in 'x.bin'|id -1 at position 2"):
    check_token_ids(np.array([0, 1, -1], np.int32), 5, "x.bin")


def test_meta_pkl_that_names_code_is_refused(tmp_path):
  char_folder(tmp_path)

  class Evil:
    def __reduce__(self):
      return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

  with open(tmp_path / "meta.pkl", "wb") as f:
    pickle.dump({"vocab_size": 3, "itos": Evil()}, f)
  with pytest.raises(ConfigError, match=r"meta.pkl: it names posix.system|meta.pkl.*names .*system"):
    load_dataset({"name": "tokens", "path": str(tmp_path), "block_size": 8})
  assert not (tmp_path / "pwned").exists()
