"""The user's own data: .npz arrays and folders of text files, through scripts/train.py."""

import json
import os
import sys

import numpy as np
import pytest
from sklearn.datasets import load_digits

import fjt
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import train as train_cli  # noqa: E402  scripts/train.py, called in-process.

MLP = os.path.join(ROOT, "configs", "digits_mlp.py")
CNN = os.path.join(ROOT, "configs", "digits_cnn.py")
NNLM = os.path.join(ROOT, "configs", "text_nnlm.py")
QUICK = ["--config.train.steps=60", "--config.train.eval_every=60", "--config.optimizer.warmup_steps=5",
         "--config.ema.decay=0", "--config.swa.every=0"]


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory):
  digits = load_digits()
  folder = tmp_path_factory.mktemp("npz")
  images = (digits.images / 16.0).astype(np.float64)  # float64 and int64, as numpy makes them.
  np.savez(folder / "flat.npz", x=images.reshape(len(images), 64), y=digits.target)
  np.savez(folder / "nchw.npz", x=images[:, None], y=digits.target)
  return folder


def test_arrays_dataset_trains_from_the_command_line(digits_npz, tmp_path, capsys):
  rc = train_cli.main(["--config", MLP, "--workdir", str(tmp_path), "--config.data.name=arrays",
                       f"--config.data.path={digits_npz / 'flat.npz'}", *QUICK])
  assert rc == 0, capsys.readouterr().err
  summary = json.load(open(tmp_path / "summary.json"))
  assert summary["eval"]["accuracy"] > 0.9
  config = json.load(open(tmp_path / "config.json"))
  assert config["data"] == {"name": "arrays", "path": str(digits_npz / "flat.npz"), "layout": "",
                            "test_fraction": 0.2, "split_seed": 0, "task": ""}


def test_arrays_split_is_seeded_and_stratified(digits_npz):
  a = fjt.load_dataset({"name": "arrays", "path": str(digits_npz / "flat.npz")})
  b = fjt.load_dataset({"name": "arrays", "path": str(digits_npz / "flat.npz")})
  np.testing.assert_array_equal(a.test["y"], b.test["y"])
  assert a.train["x"].dtype == np.float32 and a.train["y"].dtype == np.int32
  assert a.num_classes == 10 and a.task == "classification" and len(a.test["y"]) == 360
  assert np.bincount(a.test["y"]).min() >= 35  # Every class in the test split.


def test_an_nchw_array_for_an_nhwc_model_names_the_axis_to_move(digits_npz, tmp_path, capsys):
  rc = train_cli.main(["--config", CNN, "--workdir", str(tmp_path), "--config.data.name=arrays",
                       f"--config.data.path={digits_npz / 'nchw.npz'}", *QUICK])
  err = capsys.readouterr().err
  assert rc == 2 and err.count("\n") == 1, err
  assert "NCHW (1437, 1, 8, 8)" in err and "np.moveaxis(x, 1, -1)" in err


def test_float_targets_make_a_regression_dataset(tmp_path):
  x = np.random.default_rng(0).normal(size=(100, 3))
  np.savez(tmp_path / "r.npz", x=x, y=x[:, :1] * 2.0)
  data = fjt.load_dataset({"name": "arrays", "path": str(tmp_path / "r.npz")})
  assert data.task == "regression" and data.num_classes is None and data.train["y"].shape == (80, 1)


@pytest.mark.parametrize("contents, message", [
    ({"x": np.zeros((3, 2))}, "has no array 'y'"),
    ({"x": np.zeros((3, 2)), "y": np.zeros(4)}, "3 rows of 'x' but 4 of 'y'"),
])
def test_bad_npz_files_are_named(tmp_path, contents, message):
  np.savez(tmp_path / "bad.npz", **contents)
  with pytest.raises(fjt.ConfigError, match=message):
    fjt.load_dataset({"name": "arrays", "path": str(tmp_path / "bad.npz")})
  with pytest.raises(fjt.ConfigError, match="does not exist"):
    fjt.load_dataset({"name": "arrays", "path": str(tmp_path / "missing.npz")})


def test_text_files_dataset_trains_from_the_command_line(tmp_path, capsys):
  docs = tmp_path / "docs"
  (docs / "sub").mkdir(parents=True)
  words = "the cat sat on the mat and the dog ran to the park while a bird sang".split()
  rng = np.random.default_rng(0)
  for i in range(12):
    folder = docs / "sub" if i % 3 else docs
    suffix = (".txt", ".md", ".rst")[i % 3]
    (folder / f"doc{i}{suffix}").write_text(" ".join(rng.choice(words, 300)) + "\n")
  (docs / "ignored.py").write_text("not text")
  data = fjt.load_dataset({"name": "text_files", "paths": (str(docs),), "vocab_size": 50})
  assert data.info["files"]["train"] + data.info["files"]["validation"] == 12
  assert data.info["files"]["validation"] >= 1 and data.num_classes == 50
  assert data.train["x"].shape[1] == 4 and data.task == "language_model"
  rc = train_cli.main(["--config", NNLM, "--workdir", str(tmp_path / "run"),
                       "--config.data.name=text_files", f"--config.data.paths={docs}",
                       "--config.data.vocab_size=50", "--config.model.vocab_size=50",
                       "--config.model.embed_dim=16", "--config.model.hidden=32",
                       "--config.train.batch_size=64", *QUICK])
  assert rc == 0, capsys.readouterr().err
  summary = json.load(open(tmp_path / "run" / "summary.json"))
  # 16 words drawn uniformly: a model that learnt the unigram gets close to 16.
  assert summary["eval"]["perplexity"] < 25


def test_text_files_name_what_is_missing(tmp_path):
  with pytest.raises(fjt.ConfigError, match="matches no file"):
    fjt.load_dataset({"name": "text_files", "paths": (str(tmp_path / "nothing*"),)})
