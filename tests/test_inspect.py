"""Activations of a forward pass and word embeddings (fjt.activations, fjt.embeddings,
scripts/summary.py --activations, scripts/embeddings.py)."""

import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fjt
from conftest import ROOT
from fjt import activations, embeddings, runs
from fjt.data import dataset_vocabulary
from fjt.tree import unbox


def _script(name: str):
  spec = importlib.util.spec_from_file_location(f"script_{name}", os.path.join(ROOT, "scripts", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _expected_stats(a: np.ndarray) -> dict:
  finite = a[np.isfinite(a)]
  return {"mean": finite.mean(), "std": finite.std(), "min": finite.min(), "max": finite.max(),
          "zeros": np.mean(a == 0), "dead": np.mean(np.all(a == 0, axis=0)),
          "nonfinite": int(a.size - finite.size)}


@pytest.mark.parametrize("nan_input", [False, True])
def test_mlp_activations_equal_a_manual_forward_pass(nan_input):
  # Small integers: every product and sum is exact in float32, so the table must equal the
  # float64 numpy forward pass exactly, zero and dead fractions included.
  rng = np.random.default_rng(0)
  x = rng.integers(-3, 4, (16, 4)).astype(np.float32)
  if nan_input:
    x[0, 0] = np.nan
  shapes = [(4, 6), (6, 5), (5, 3)]
  kernels = [rng.integers(-2, 3, s).astype(np.float32) for s in shapes]
  biases = [rng.integers(-2, 3, s[1]).astype(np.float32) for s in shapes]
  biases[0][:2] = -100.0  # Units 0 and 1 of the first layer never fire.
  params = {f"Dense_{i}": {"kernel": k, "bias": b} for i, (k, b) in enumerate(zip(kernels, biases))}
  model = fjt.MLP(features=(6, 5), num_classes=3, batch_norm=False)

  rows = activations.activations(model, {"params": params}, {"x": x, "y": np.zeros(16, np.int32)})

  manual, h = {}, x.astype(np.float64)
  for i, (k, b) in enumerate(zip(kernels, biases)):
    h = h @ k + b
    manual[f"Dense_{i}"] = h
    if i < 2:
      h = np.maximum(h, 0)
      manual[f"relu_{i}"] = h
  manual["(output)"] = h
  assert [r.path for r in rows] == list(manual)
  for row in rows:
    assert row.shape == manual[row.path].shape and row.dtype == "float32"
    expected = _expected_stats(manual[row.path])
    assert row.stats == pytest.approx(expected, rel=0, abs=0, nan_ok=True), row.path
  relu_0 = {r.path: r for r in rows}["relu_0"].stats
  if nan_input:  # Example 0 is NaN in every unit: no unit is 0 for every example.
    assert relu_0["nonfinite"] == 6 and relu_0["dead"] == 0.0
  else:
    # Units 0 and 1 by their bias, unit 3 because x0 - x2 - 2 <= 0 on this batch.
    assert relu_0["dead"] == 3 / 6 and relu_0["nonfinite"] == 0
    assert relu_0["zeros"] == np.count_nonzero(manual["relu_0"] == 0) / 96


def _paths(rows):
  return {r.path: r.shape for r in rows}


def test_table_of_cnn_nnlm_and_a_user_model_without_train():
  cnn = fjt.CNN(features=(4, 8), dense_features=(16,), num_classes=10)
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1)))
  variables = fjt.init_variables(cnn, x, jax.random.PRNGKey(1))
  shapes = _paths(activations.activations(cnn, variables, x))
  assert shapes["relu_0"] == (2, 8, 8, 4) and shapes["relu_1"] == (2, 4, 4, 8)
  assert shapes["relu_2"] == (2, 16) and shapes["BatchNorm_1"] == (2, 4, 4, 8)
  assert shapes["(output)"] == (2, 10)

  nnlm = fjt.NNLM(vocab_size=50, embed_dim=8, hidden=16)
  ids = np.arange(12, dtype=np.int32).reshape(3, 4)
  variables = fjt.init_variables(nnlm, ids, jax.random.PRNGKey(0))
  rows = activations.activations(nnlm, variables, ids)
  assert [r.path for r in rows] == ["Embed_0", "Dense_0", "BatchNorm_0", "relu_0", "Dense_1", "(output)"]
  assert _paths(rows)["Embed_0"] == (3, 4, 8) and _paths(rows)["relu_0"] == (3, 16)
  table = variables["params"]["Embed_0"]["embedding"]
  assert rows[0].stats["mean"] == np.asarray(table)[ids].astype(np.float64).mean()

  class Plain(nn.Module):  # A user's model: no train argument.
    @nn.compact
    def __call__(self, x):
      return jnp.tanh(nn.Dense(3)(x))

  plain = Plain()
  variables = plain.init(jax.random.PRNGKey(0), np.ones((2, 5), np.float32))
  rows = activations.activations(plain, variables, np.ones((2, 5), np.float32))
  text = activations.format_activations(rows)
  assert text.splitlines()[0].split() == ["path", "shape", "dtype", "mean", "std", "min", "max",
                                          "zeros", "dead", "nonfinite"]
  assert [line.split()[0] for line in text.splitlines()[2:]] == ["Dense_0", "(output)"]


def test_table_and_embedding_of_gpt():
  gpt_module = pytest.importorskip("fjt.models.gpt", reason="GPT is on branch gpt")
  gpt = gpt_module.GPT(vocab_size=50, block_size=8, num_layers=2, num_heads=2, embed_dim=8,
                       dropout_rate=0.0)
  ids = np.arange(12, dtype=np.int32).reshape(2, 6) % 50
  variables = gpt.init(jax.random.PRNGKey(0), ids)
  shapes = _paths(activations.activations(gpt, variables, ids))
  assert shapes["wte"] == (2, 6, 8) and shapes["h_1/mlp/c_fc"] == (2, 6, 32)
  assert shapes["h_0"] == (2, 6, 8) and shapes["(output)"] == (2, 6, 50)
  vocab = [f"w{i}" for i in range(50)]
  path, table = embeddings.embedding_table(variables, len(vocab))
  assert path == "params/wte/embedding" and table.shape == (50, 8)  # Not wpe (8 rows).
  (w,) = embeddings.embedding(variables, vocab, ["w7"])
  # model.init's params carry logical-axis boxes; the library unboxes, the test too.
  np.testing.assert_array_equal(w.vector,
                                np.asarray(unbox(variables)["params"]["wte"]["embedding"])[7])


def test_embedding_reports_unknown_words_and_ranks_neighbours_by_cosine():
  rng = np.random.default_rng(0)
  table = rng.normal(size=(10, 4)).astype(np.float32)
  table[9] = 0.0  # A zero row: cosine 0 with everything, never NaN.
  variables = {"params": {"Embed_0": {"embedding": table},
                          "pos": {"embedding": np.zeros((16, 4), np.float32)}}}
  vocab = ["<s>", "<unk>"] + list("abcdefgh")
  found = embeddings.embedding(variables, vocab, ["c", "zzz", "<unk>"], neighbors=4)
  assert [(w.word, w.index) for w in found] == [("c", 4), ("zzz", None), ("<unk>", 1)]
  assert found[1].vector is None and found[1].neighbors == ()  # Never the <unk> row.
  np.testing.assert_array_equal(found[0].vector, table[4])

  wide = table.astype(np.float64)
  unit = wide / np.maximum(np.linalg.norm(wide, axis=1, keepdims=True), 1e-300)
  cos = unit @ unit[4]
  ranking = [int(i) for i in np.argsort(-cos, kind="stable") if i != 4][:4]
  assert [n for n, _ in found[0].neighbors] == [vocab[i] for i in ranking]
  np.testing.assert_allclose([c for _, c in found[0].neighbors], cos[ranking], rtol=1e-12)
  assert embeddings.nearest(table, 9, 9) == [(i, 0.0) for i in range(9)]

  as_dict = embeddings.embedding(variables, {w: i for i, w in enumerate(vocab)}, ["c"], neighbors=4)
  assert as_dict[0].neighbors == found[0].neighbors
  with pytest.raises(ValueError, match="pass its path"):
    embeddings.embedding_table(variables)  # Two tables, no vocabulary size to tell them apart.
  with pytest.raises(ValueError, match="no leaf 'params/wte/embedding'"):
    embeddings.embedding(variables, vocab, ["c"], path="params/wte/embedding")


def test_dataset_vocabulary_from_a_word_list_or_a_word_tokenizer():
  words = ["<s>", "<unk>", "the"]
  assert dataset_vocabulary({"vocab": words}) == words
  assert dataset_vocabulary({"tokenizer": {"type": "word", "vocab": words}}) == words
  assert dataset_vocabulary({"tokenizer": '{"type": "word", "vocab": ["<s>"]}'}) == ["<s>"]
  assert dataset_vocabulary({"tokenizer": {"type": "bpe"}}) is None
  assert dataset_vocabulary({"task": "classification"}) is None


def test_clis_on_a_trained_nnlm_run_and_a_config(tmp_path, capsys):
  config = fjt.load_config(os.path.join(ROOT, "configs", "text_nnlm.py"))
  config.data.vocab_size = config.model.vocab_size = 300
  config.model.embed_dim, config.model.hidden = 8, 16
  config.train.steps = config.train.eval_every = config.checkpoint.every_steps = 2
  config.train.log_every, config.optimizer.warmup_steps = 1, 1
  run = str(tmp_path / "nnlm")
  fjt.train_and_evaluate(config, run)
  capsys.readouterr()

  embeddings_cli = _script("embeddings")
  out = str(tmp_path / "v.npy")
  assert embeddings_cli.main([run, "return", "Return", "xyzzy", "--neighbors", "3", "--out", out]) == 1
  text = capsys.readouterr().out
  assert text.splitlines()[0] == "params/Embed_0/embedding: (300, 8) float32, vocabulary of 300 words"
  assert "Return  not in the vocabulary (did you mean 'return'?)" in text
  assert "xyzzy   not in the vocabulary" in text
  vocab = runs.run_vocabulary(run)
  variables = fjt.checkpoint.load_variables(run)
  (word,) = embeddings.embedding(variables, vocab, ["return"], neighbors=3)
  np.testing.assert_array_equal(np.load(out), word.vector[None])
  assert "nearest: " + ", ".join(f"{n} {c:.3f}" for n, c in word.neighbors) in text
  assert embeddings_cli.main([run, "return"]) == 0
  capsys.readouterr()
  assert embeddings_cli.main([os.path.join(ROOT, "configs", "digits_mlp.py"), "one"]) == 2
  assert "carries no word vocabulary" in capsys.readouterr().err

  summary_cli = _script("summary")
  assert summary_cli.main([run, "--activations", "--batch", "8"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert [line.split()[:3] for line in lines[2:]][3] == ["relu_0", "(8,", "16)"]
  png = str(tmp_path / "acts.png")
  config_file = os.path.join(ROOT, "configs", "digits_mlp.py")
  assert summary_cli.main([config_file, "--activations", "--batch", "16", "--plot", png]) == 0
  assert "relu_1       (16, 256)" in capsys.readouterr().out and os.path.getsize(png) > 0
