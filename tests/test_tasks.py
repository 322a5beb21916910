"""Tasks, losses, models without `train`, extra rng streams and dict inputs (fjt.tasks, fjt.steps)."""

import ast
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import fjt
from conftest import ROOT

B_TOTAL, T, VOCAB = 7, 5, 11


class TinySequenceModel(nn.Module):
  """Token ids (B, T) -> logits (B, T, VOCAB); no `train` argument."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(VOCAB)(nn.Embed(VOCAB, 8)(x))


@pytest.fixture(scope="module")
def sequence_case():
  rng = np.random.default_rng(0)
  x = rng.integers(0, VOCAB, (B_TOTAL, T)).astype(np.int32)
  y = rng.integers(0, VOCAB, (B_TOTAL, T)).astype(np.int32)
  model = TinySequenceModel()
  variables = fjt.init_variables(model, x[:1], jax.random.PRNGKey(0))
  logits = np.asarray(model.apply(variables, x), np.float64)
  log_p = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  nll = -np.take_along_axis(log_p, y[..., None], -1)[..., 0]
  hits = (logits.argmax(-1) == y).astype(np.float64)
  return model, variables, {"x": x, "y": y}, nll, hits


@pytest.mark.parametrize("batch_size", [1, T, B_TOTAL + 1])
@pytest.mark.parametrize("task", ["classification", "language_model"])
def test_per_token_evaluation_equals_numpy(sequence_case, task, batch_size):
  model, variables, arrays, nll, hits = sequence_case
  metrics = fjt.evaluate(fjt.make_eval_step(model, task), variables, arrays, batch_size)
  np.testing.assert_allclose(metrics["loss"], nll.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], hits.mean(), rtol=1e-6)
  assert 0.0 <= metrics["accuracy"] <= 1.0
  if task == "language_model":
    np.testing.assert_allclose(metrics["perplexity"], np.exp(nll.mean()), rtol=1e-5)


def test_a_per_token_mask_weighs_exactly(sequence_case):
  model, variables, arrays, nll, hits = sequence_case
  mask = (np.arange(T)[None, :] < np.arange(1, B_TOTAL + 1)[:, None] % T + 1).astype(np.float32)
  metrics = fjt.evaluate(fjt.make_eval_step(model), variables, {**arrays, "mask": mask}, 3)
  np.testing.assert_allclose(metrics["loss"], (nll * mask).sum() / mask.sum(), rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], (hits * mask).sum() / mask.sum(), rtol=1e-6)


def test_labels_that_do_not_fit_the_outputs_are_an_error_naming_both_shapes(sequence_case):
  model, variables, arrays, _, _ = sequence_case
  bad = {"x": arrays["x"], "y": arrays["y"][:, :1]}
  with pytest.raises(ValueError, match=r"outputs have shape \(2, 5, 11\).*\(2, 5\).*got \(2, 1\)"):
    fjt.evaluate(fjt.make_eval_step(model), variables, bad, 2)
  floats = {"x": arrays["x"], "y": arrays["y"].astype(np.float32)}
  with pytest.raises(ValueError, match="must be integers.*use task 'regression'"):
    fjt.evaluate(fjt.make_eval_step(model), variables, floats, 2)


def _regression_data(n=512, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 4)).astype(np.float32)
  y = (np.sin(x[:, :1] * 2) + x[:, 1:2] * x[:, 2:3]).astype(np.float32)
  return x, y


def test_regression_mlp_reaches_a_tenth_of_the_target_variance():
  x, y = _regression_data()
  model = fjt.MLP(features=(64, 64), num_classes=1, batch_norm=False)
  tx = optax.adam(3e-3)
  state = fjt.create_train_state(model, tx, x[:1], jax.random.PRNGKey(0))
  train_step = fjt.make_train_step(model, tx, task="regression")
  arrays = {"x": x[:400], "y": y[:400]}
  for step in range(600):
    state, metrics = train_step(state, fjt.get_batch(arrays, 0, step, 64))
  assert set(metrics) == {"loss", "mse", "mae"}
  test = fjt.evaluate(fjt.make_eval_step(model, "regression"), state, {"x": x[400:], "y": y[400:]},
                      50)
  assert test["mse"] < 0.1 * float(y[400:].var()), test
  outputs = np.asarray(model.apply(state.variables, x[400:], train=False), np.float64)
  np.testing.assert_allclose(test["mse"], np.mean((outputs - y[400:]) ** 2), rtol=1e-5)
  np.testing.assert_allclose(test["mae"], np.mean(np.abs(outputs - y[400:])), rtol=1e-5)


def test_a_custom_loss_fn_is_the_loss_that_is_minimised():
  x, _ = _regression_data(64)
  model = nn.Dense(2)  # No `train` argument.

  def loss_fn(outputs, batch):  # Pull every output to 3, whatever y says.
    return jnp.mean(jnp.square(outputs - 3.0))

  tx = optax.sgd(0.1)
  state = fjt.create_train_state(model, tx, x[:1], jax.random.PRNGKey(0))
  train_step = fjt.make_train_step(model, tx, task=loss_fn)
  arrays = {"x": x, "y": np.zeros(len(x), np.int32)}
  first = None
  for step in range(200):
    state, metrics = train_step(state, fjt.get_batch(arrays, 0, step, 16))
    first = first if first is not None else float(metrics["loss"])
  outputs = np.asarray(model.apply({"params": state.params}, x))
  np.testing.assert_allclose(outputs, 3.0, atol=0.05)
  # Evaluation applies the loss per example, so padding never counts.
  metrics = fjt.evaluate(fjt.make_eval_step(model, loss_fn), state, arrays, 10)
  np.testing.assert_allclose(metrics["loss"], np.mean((outputs - 3.0) ** 2), rtol=1e-4, atol=1e-7)
  assert float(metrics["loss"]) < first / 100


class NoisyModel(nn.Module):
  """Needs a "noise" rng stream in training as well as "dropout"."""

  @nn.compact
  def __call__(self, x, train: bool):
    if train:
      x = x + 0.01 * jax.random.normal(self.make_rng("noise"), x.shape)
    x = nn.Dropout(0.1, deterministic=not train)(nn.relu(nn.Dense(32)(x)))
    return nn.Dense(10)(x)


def test_a_model_with_a_second_rng_stream_trains():
  data = fjt.load_dataset({"name": "digits"})
  model, tx = NoisyModel(), optax.adam(1e-2)
  state = fjt.create_train_state(model, tx, data.train["x"][:1], jax.random.PRNGKey(0))
  with pytest.raises(Exception, match="noise"):
    fjt.make_train_step(model, tx)(state, fjt.get_batch(data.train, 0, 0, 32))
  train_step = fjt.make_train_step(model, tx, rng_streams=("dropout", "noise"))
  for step in range(100):
    state, _ = train_step(state, fjt.get_batch(data.train, 0, step, 64))
  metrics = fjt.evaluate(fjt.make_eval_step(model), state, data.test, 360)
  assert metrics["accuracy"] > 0.85


class TwoInputs(nn.Module):
  """x is a dict: {"pixels": (B, 64), "parity": (B, 1)}."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(jnp.concatenate([x["pixels"], x["parity"]], -1))


def test_dict_inputs_batch_and_train_through_fit(tmp_path):
  digits = fjt.load_dataset({"name": "digits"})
  split = lambda part: {"x": {"pixels": part["x"], "parity": (part["y"][:, None] % 2).astype(np.float32)},
                        "y": part["y"]}
  dataset = fjt.Dataset(split(digits.train), split(digits.test), 10)
  batch = fjt.get_batch(dataset.train, 0, 3, 8)
  assert batch["x"]["pixels"].shape == (8, 64) and batch["x"]["parity"].shape == (8, 1)
  config = ml_collections.ConfigDict({
      "seed": 0, "data": {"name": "unused"}, "model": {"name": "unused"},
      "optimizer": {"name": "adam", "learning_rate": 1e-2},
      "train": {"steps": 60, "batch_size": 32, "eval_every": 60}})
  _, summary = fjt.fit(config, str(tmp_path), model=TwoInputs(), dataset=dataset, progress=False)
  assert summary["eval"]["accuracy"] > 0.85


def test_gradient_accumulation_equals_one_step_on_the_whole_batch():
  x, y = _regression_data(32)
  model = fjt.MLP(features=(16,), num_classes=1, batch_norm=False)
  tx = optax.adam(1e-2)
  state = fjt.create_train_state(model, tx, x[:1], jax.random.PRNGKey(0))
  batch = {"x": x, "y": y}
  whole, whole_metrics = jax.jit(fjt.train_step_fn(model, tx, "regression"))(state, batch)
  accumulated, accumulated_metrics = jax.jit(
      fjt.train_step_fn(model, tx, "regression", grad_accum_steps=4))(state, batch)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               whole.params, accumulated.params)
  np.testing.assert_allclose(whole_metrics["loss"], accumulated_metrics["loss"], rtol=1e-5)


def test_models_and_datasets_register_by_name(tmp_path, monkeypatch):
  # The registries are module-level dicts: restore them afterwards.
  monkeypatch.setattr(fjt.models, "MODELS", dict(fjt.models.MODELS))
  monkeypatch.setattr(fjt.data, "DATASETS", dict(fjt.data.DATASETS))

  @fjt.models.register("tiny_dense_for_test")
  class TinyDense(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
      return nn.Dense(self.num_classes)(x.reshape(len(x), -1))

  @fjt.data.register("digits_small_for_test")
  def load(keep: int = 500) -> fjt.Dataset:
    digits = fjt.load_dataset({"name": "digits"})
    return fjt.Dataset({k: v[:keep] for k, v in digits.train.items()}, digits.test, 10)

  config = fjt.apply_overrides(fjt.load_config(os.path.join(ROOT, "configs", "digits_mlp.py")), [
      "model.name=tiny_dense_for_test", "data.name=digits_small_for_test", "data.keep=300",
      "train.steps=20", "train.eval_every=20", "optimizer.warmup_steps=2", "ema.decay=0",
      "swa.every=0", "checkpoint.best_metric="])
  assert dict(config.model) == {"name": "tiny_dense_for_test", "num_classes": 10}
  assert dict(config.data) == {"name": "digits_small_for_test", "keep": 300}
  assert fjt.train_and_evaluate(config, str(tmp_path), progress=False)["step"] == 20


def _fjt_imports(path: str, module: str, known: set[str]) -> set[str]:
  """The fjt modules that ``module`` (file ``path``) imports, anywhere in the file."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    for name in names:
      while name and name not in known:
        name = name.rpartition(".")[0]
      if name and name != module and name != "fjt":
        found.add(name)
  return found


def test_fjt_modules_import_no_cycle():
  files = {}
  for dirpath, _, names in os.walk(os.path.join(ROOT, "fjt")):
    for name in names:
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, name), ROOT)[:-3].replace(os.sep, ".")
        files[rel.removesuffix(".__init__")] = os.path.join(dirpath, name)
  graph = {m: _fjt_imports(p, m, set(files)) for m, p in files.items()}
  # A package's __init__ re-exports its submodules; a submodule importing its own package's
  # siblings goes through the package, so packages count as their submodules' parents only.
  state = {}

  def visit(module, stack):
    state[module] = "open"
    for dep in sorted(graph[module]):
      if dep.startswith(module + "."):
        continue
      if state.get(dep) == "open":
        raise AssertionError("import cycle: " + " -> ".join(stack + [module, dep]))
      if dep not in state:
        visit(dep, stack + [module])
    state[module] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [])
  # The loop is no toolbox: only the module that composes loops imports it.
  assert [m for m, deps in graph.items() if "fjt.train" in deps] == ["fjt.experiment"]
  assert not any(m.startswith("fjt.bench") for m in graph)  # Benchmarks live in scripts/.
