import numpy as np
import pytest

import fjt
from fjt.config import ConfigError
from fjt.data import batching, digits, text


def test_digits_split_is_fixed_stratified_and_scaled():
  flat = digits.load("flat")
  assert flat.train["x"].shape == (1437, 64) and flat.test["x"].shape == (360, 64)
  assert flat.train["x"].dtype == np.float32 and flat.train["y"].dtype == np.int32
  assert flat.train["x"].min() == 0.0 and flat.train["x"].max() == 1.0
  # Stratified: every class has the same share in the test split, within one example.
  counts = np.bincount(flat.test["y"], minlength=10)
  assert counts.min() >= 35 and counts.max() <= 37
  nhwc = digits.load("nhwc")
  assert nhwc.test["x"].shape == (360, 8, 8, 1)
  np.testing.assert_array_equal(nhwc.test["x"].reshape(360, 64), flat.test["x"])
  np.testing.assert_array_equal(digits.load("flat").test["y"], flat.test["y"])


def test_digits_class_subset_is_relabelled():
  upper = digits.load("flat", classes=(5, 6, 7, 8, 9))
  full = digits.load("flat")
  assert upper.num_classes == 5
  np.testing.assert_array_equal(upper.test["y"], full.test["y"][full.test["y"] >= 5] - 5)
  with pytest.raises(ValueError, match="data.classes"):
    digits.load("flat", classes=(3, 3))


def test_batches_are_a_pure_function_of_seed_and_step():
  n, bs = 103, 10
  per_epoch = batching.steps_per_epoch(n, bs)
  epoch0 = np.concatenate([batching.batch_indices(7, s, n, bs) for s in range(per_epoch)])
  assert len(set(epoch0.tolist())) == per_epoch * bs  # No repeats within an epoch.
  # Recomputing any step, in any order, gives the same batch.
  batching._epoch_permutation.cache_clear()
  np.testing.assert_array_equal(batching.batch_indices(7, 3, n, bs), epoch0[30:40])
  assert not np.array_equal(batching.batch_indices(8, 3, n, bs), epoch0[30:40])
  assert not np.array_equal(batching.batch_indices(7, 3 + per_epoch, n, bs), epoch0[30:40])


def test_eval_batches_cover_every_example_once_with_a_mask():
  arrays = {"x": np.arange(25, dtype=np.float32), "y": np.arange(25, dtype=np.int32)}
  batches = list(batching.eval_batches(arrays, 10))
  assert [b["x"].shape for b in batches] == [(10,)] * 3
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(np.concatenate([b["y"] for b in batches])[mask == 1], arrays["y"])
  assert mask.sum() == 25


def test_text_vocab_windows_and_unigram_baseline():
  docs = [("the cat sat".split()), ("the dog".split())]
  vocab = text.build_vocab(docs, vocab_size=4)
  assert vocab == {"<s>": 0, "<unk>": 1, "the": 2, "cat": 3}
  x, y = text.windows(docs, vocab, context=2)
  np.testing.assert_array_equal(x, [[0, 0], [0, 2], [2, 3], [0, 0], [0, 2]])
  np.testing.assert_array_equal(y, [2, 3, 1, 2, 1])
  # Add-one unigram on y = [2, 3, 1, 2, 1] over 4 words: counts + 1 = [1, 3, 3, 2] / 9.
  ppl = text.unigram_perplexity(y, np.array([2, 0]), 4)
  assert ppl == pytest.approx(np.exp(-(np.log(3 / 9) + np.log(1 / 9)) / 2), rel=1e-12)


def test_text_corpus_is_the_stdlib_split_by_file():
  files = text.stdlib_docstrings()
  paths = [p for p, _ in files]
  assert len(paths) == len(set(paths)) > 100
  assert all(t.islower() for _, docs in files[:20] for doc in docs for t in doc)
  assert not any(p.startswith(("test/", "site-packages/")) for p in paths)
  validation = [p for p in paths if text.is_validation_file(p)]
  assert 0.03 < len(validation) / len(paths) < 0.2
  assert sum(len(doc) for _, docs in files for doc in docs) > 100_000


def test_unknown_dataset_and_option_are_named():
  with pytest.raises(ConfigError, match=r"unknown dataset 'mnist'"):
    fjt.load_dataset({"name": "mnist"})
  with pytest.raises(ConfigError, match=r"'data.shape' is not an option of dataset 'digits'"):
    fjt.load_dataset({"name": "digits", "shape": "flat"})
  with pytest.raises(ConfigError, match=r"'data.layout'"):
    fjt.load_dataset({"name": "digits", "layout": "nchw"})
