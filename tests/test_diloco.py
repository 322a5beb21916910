"""DiLoCo on text: the non-IID split by source and a tiny GPT run with its baselines."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

import fjt
import fjt.replicas
from conftest import ROOT
from fjt.data import splits, text, text_files

WORDS = ("the", "a", "file", "path", "return", "value", "list", "of", "is", "and", "to", "in")
# Synthetic text files: four top-level sources (folders 'email', 'json', 'xml'; file 'os.txt').
FILES = {"email/header.txt": 240, "email/utils.txt": 160, "json/decoder.txt": 150,
         "xml/dom.txt": 120, "os.txt": 60, "val.txt": 80}


def write_corpus(root) -> str:
  rng = np.random.default_rng(0)
  for name, words in FILES.items():
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      f.write(" ".join(rng.choice(WORDS, words)))
  return str(root)


def test_source_name_is_the_top_level_package_or_module():
  assert [text.source_name(p) for p in ("email/mime/text.py", "json/decoder.py", "os.py")] == \
      ["email", "json", "os"]


def test_source_split_deals_whole_sources_largest_first_to_the_emptiest_replica():
  counts = {0: 5, 1: 3, 2: 9, 3: 1, 4: 4, 5: 2}  # Source id: examples.
  sources = np.random.default_rng(0).permutation(np.repeat(list(counts), list(counts.values())))
  shards = splits.source_split(sources, 3)
  # 2 (9) -> r0; 0 (5) -> r1; 4 (4) -> r2; 1 (3) -> r2 (4 < 5); 5 (2) -> r1 (5 < 7 = 7, lower);
  # 3 (1) -> r1 (r1 and r2 hold 7, the lower index).
  assert [sorted(set(sources[s].tolist())) for s in shards] == [[2], [0, 3, 5], [1, 4]]
  assert [len(s) for s in shards] == [9, 8, 7]
  np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.arange(len(sources)))
  assert all(s.dtype == np.int64 and np.all(np.diff(s) > 0) for s in shards)
  with pytest.raises(ValueError, match="'replicas.split': 'by_source' gives each replica whole "
                                       "sources, but the training set has 6 sources for 7"):
    splits.source_split(sources, 7)


def test_text_windows_carry_the_source_of_their_first_target():
  files = (("email/a.py", (("x", "y", "z"),)), ("os.py", (("p", "q"),)),
           ("json/d.py", (("r",),)), ("val.py", (("s", "t", "u", "v"),)))
  valid = lambda path: path == "val.py"
  # Stream <s> x y z <s> p q <s> r; names (email, json, os) -> per token 0 0 0 0 2 2 2 1 1.
  blocks = text.window_dataset(files, 20, 4, 0, valid, block_size=2)
  assert blocks.sources.names == ("email", "json", "os")
  np.testing.assert_array_equal(blocks.sources.ids, [0, 0, 0, 2, 2, 2, 1])  # Tokens 1..7.
  assert len(blocks.sources.ids) == blocks.num_train
  words = text.window_dataset(files, 20, 4, 0, valid)  # A window per word.
  np.testing.assert_array_equal(words.sources.ids, [0, 0, 0, 2, 2, 1])
  assert "sources" not in words.info  # info is JSON; the ids live on the Dataset.


def test_by_source_needs_a_dataset_with_sources():
  config = fjt.load_config(os.path.join(ROOT, "configs", "digits_fedavg.py"))
  config.replicas.split = "by_source"
  opts = fjt.replicas.ReplicaOptions.from_config(config)
  with pytest.raises(fjt.ConfigError, match="^config key 'replicas.split': 'by_source' needs a "
                                            "dataset that records each training example's source"):
    fjt.replicas.split_dataset(fjt.load_dataset({"name": "digits"}), opts)


def tiny_diloco_config(corpus: str) -> ml_collections.ConfigDict:
  """configs/text_diloco.py on ``corpus`` with a GPT of 1 layer, 32 wide, block 16."""
  config = fjt.load_config(os.path.join(ROOT, "configs", "text_diloco.py"))
  config.data = ml_collections.ConfigDict(
      {"name": "text_files", "paths": (corpus,), "vocab_size": 16, "block_size": 16})
  config.model.update(vocab_size=16, block_size=16, num_layers=1, num_heads=2, embed_dim=32)
  config.replicas.update(num=3, split="by_source", rounds=2, local_steps=3, warmup_steps=2)
  config.optimizer.warmup_steps = 2
  config.train.update(batch_size=4, eval_batch_size=8, log_every=1)
  return config


def test_tiny_diloco_by_source_writes_the_three_perplexities_and_the_bytes(tmp_path):
  corpus = write_corpus(tmp_path / "corpus")
  config = tiny_diloco_config(corpus)
  dataset = text_files.load((corpus,), vocab_size=16, block_size=16)
  # Only 'val.txt' has a path hash below 10: it is the validation file.
  assert dataset.sources.names == ("email", "json", "os", "xml")
  state, summary = fjt.fit(config, str(tmp_path / "run"), progress=False)

  assert summary == json.load(open(tmp_path / "run" / "summary.json"))
  assert {"perplexity", "sync_perplexity", "single_perplexity", "unigram_perplexity"} <= \
      set(summary["eval"])
  assert not any(k.endswith("_unigram_perplexity") for k in summary["eval"])
  assert summary["eval"]["unigram_perplexity"] == dataset.info["unigram_perplexity"]
  assert all(np.isfinite(v) for v in summary["eval"].values())

  # GPT-2 params: wte V*C + wpe T*C + ln_f 2C + per layer 12 C^2 + 13 C.
  v, t, c = 16, 16, 32
  size = v * c + t * c + 2 * c + 12 * c * c + 13 * c
  assert sum(x.size for x in jax.tree.leaves(state.params)) == size == 13_792
  assert summary["communication"] == {
      "rounds": 2, "dtype": "bfloat16",
      "bytes_per_replica": 2 * size * 2,  # 2 rounds of a bfloat16 pseudo-gradient.
      "sync_bytes_per_replica": 2 * 3 * size * 4,  # 6 inner steps of a float32 gradient.
      "ratio": 6.0,  # H = 3 steps per round, 4 bytes against 2.
      "warmup_bytes_per_replica": 2 * size * 4,  # The warm start's 2 synchronous steps.
      "ratio_with_warmup": (2 * 4 + 2 * 3 * 4) / (2 * 4 + 2 * 2)}

  # Whole sources per replica, largest first to the replica with the fewest windows so far.
  report = json.load(open(tmp_path / "run" / "splits.json"))
  # Stream: email tokens 0..401 (400 words, 2 <s>), json 402..552, os 553..613, xml 614..734;
  # windows' first targets are tokens 1..719 (735 - 16 windows).
  assert np.bincount(dataset.sources.ids).tolist() == [401, 151, 61, 106]  # email json os xml
  assert report["sources"] == [{"email": 401}, {"json": 151}, {"xml": 106, "os": 61}]
  assert report["counts"] == [401, 151, 167] and dataset.num_train == 719
  shards = fjt.replicas.split_dataset(dataset, fjt.replicas.ReplicaOptions.from_config(config))
  np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.arange(dataset.num_train))
  assert [sorted(set(dataset.sources.ids[s].tolist())) for s in shards] == [[0], [1], [2, 3]]
  assert "sources" not in summary["replicas"] and summary["replicas"]["split"] == "by_source"
