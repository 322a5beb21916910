import json
import os

import jax
import numpy as np
import pytest

import fjt
import fjt.train
from conftest import tiny_digits_config


def test_two_runs_with_the_same_seed_are_bitwise_identical(tmp_path):
  config = tiny_digits_config("cnn", steps=20)
  state_a, summary_a = fjt.fit(config, str(tmp_path / "a"), progress=False)
  state_b, summary_b = fjt.fit(config, str(tmp_path / "b"), progress=False)
  jax.tree.map(np.testing.assert_array_equal, state_a, state_b)
  assert summary_a == summary_b
  config.seed = 1
  state_c, _ = fjt.fit(config, str(tmp_path / "c"), progress=False)
  assert not np.array_equal(state_a.params["Dense_0"]["kernel"], state_c.params["Dense_0"]["kernel"])


def test_train_step_compiles_once_per_run(tmp_path, monkeypatch):
  steps = []
  make = fjt.train.make_train_step
  monkeypatch.setattr(fjt.train, "make_train_step", lambda *a, **k: steps.append(make(*a, **k)) or steps[-1])
  config = tiny_digits_config("mlp", steps=25)
  config.train.eval_every = 10  # Evaluation between steps must not cause a recompile.
  fjt.fit(config, str(tmp_path), progress=False)
  assert len(steps) == 1 and steps[0]._cache_size() == 1


def test_short_digits_run_learns_and_writes_its_workdir(tmp_path):
  config = tiny_digits_config("mlp", steps=150)
  config.train.eval_every = 50
  state, summary = fjt.fit(config, str(tmp_path), progress=False)
  assert summary["step"] == 150 == int(state.step)
  assert summary["eval"]["accuracy"] >= 0.9
  assert json.load(open(tmp_path / "summary.json")) == summary
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows if r["split"] == "train"] == list(range(10, 151, 10))
  assert [r["step"] for r in rows if r["split"] == "eval"] == [50, 100, 150]
  assert rows[-1] == {"step": 150, "split": "eval", **summary["eval"]}
  assert set(rows[0]) == {"step", "split", "loss", "accuracy", "steps_per_sec"}
  assert os.path.getsize(tmp_path / "metrics.png") > 10_000
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))
  # Training is reflected in BatchNorm statistics; eval did not change them.
  assert not np.allclose(state.batch_stats["BatchNorm_0"]["var"], 1.0)


def test_eval_metrics_are_exact_over_padded_batches(tmp_path):
  config = tiny_digits_config("mlp", steps=5)
  state, _ = fjt.fit(config, str(tmp_path), progress=False)
  model = fjt.create_model(config.model)
  test = fjt.load_dataset(config.data).test
  eval_step = fjt.make_eval_step(model)
  whole = fjt.evaluate(eval_step, state, test, batch_size=360)
  padded = fjt.evaluate(eval_step, state, test, batch_size=100)  # 4 batches, the last one padded.
  logits = model.apply(state.variables, test["x"], train=False)
  assert whole["accuracy"] == padded["accuracy"] == np.mean(np.argmax(logits, -1) == test["y"])
  assert padded["loss"] == pytest.approx(whole["loss"], rel=1e-6)


def test_nan_loss_stops_the_run_naming_the_step(tmp_path):
  config = tiny_digits_config("mlp", steps=30)
  config.optimizer.learning_rate = 1e30
  config.optimizer.schedule = "constant"
  with pytest.raises(fjt.NonFiniteLossError, match=r"at step \d+"):
    fjt.fit(config, str(tmp_path), progress=False)


def test_model_output_must_match_the_data(tmp_path):
  config = tiny_digits_config("mlp")
  config.model.num_classes = 7
  with pytest.raises(fjt.ConfigError, match=r"'model.num_classes'.*outputs 7 classes.*has 10"):
    fjt.fit(config, str(tmp_path), progress=False)


def test_optimizers_and_schedules():
  lr = fjt.create_learning_rate_fn(
      {"learning_rate": 0.1, "schedule": "warmup_cosine", "warmup_steps": 10}, total_steps=110)
  assert float(lr(0)) == 0.0 and float(lr(10)) == pytest.approx(0.1) and float(lr(110)) == 0.0
  assert float(lr(60)) == pytest.approx(0.05)
  params = {"w": np.ones((2, 2), np.float32), "b": np.ones(2, np.float32)}
  grads = jax.tree.map(np.zeros_like, params)
  for name, arguments in (("sgd", {"momentum": 0.9}), ("adam", {}), ("adamw", {"b1": 0.8})):
    tx = fjt.create_optimizer({"name": name, "learning_rate": 0.1, "weight_decay": 0.5,
                               **arguments}, total_steps=10)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert np.all(np.asarray(updates["w"]) < 0), name  # Decay shrinks matrices...
    np.testing.assert_array_equal(updates["b"], 0.0)  # ...not biases.
  with pytest.raises(fjt.ConfigError, match="'optimizer.name'"):
    fjt.create_optimizer({"name": "lamba", "learning_rate": 0.1}, 10)
  with pytest.raises(fjt.ConfigError, match=r"'optimizer.momentum': optimizer 'adam' takes no "
                                            r"argument 'momentum'; it takes \['b1'"):
    fjt.create_optimizer({"name": "adam", "learning_rate": 0.1, "momentum": 0.9}, 10)
  with pytest.raises(fjt.ConfigError, match="'optimizer.learning_rate'.*fits float32"):
    fjt.create_optimizer({"name": "sgd", "learning_rate": 1e39}, 10)
  clipped = fjt.create_optimizer({"name": "sgd", "learning_rate": 1.0, "grad_clip_norm": 1.0}, 10)
  big = {"w": np.full((2, 2), 10.0, np.float32), "b": np.zeros(2, np.float32)}
  updates, _ = clipped.update(big, clipped.init(params), params)
  assert float(np.sqrt(sum(np.sum(np.square(u)) for u in jax.tree.leaves(updates)))) == pytest.approx(1.0)


def test_ema_and_swa_follow_their_definitions():
  from fjt.averaging import TemporalAveraging
  config = tiny_digits_config("mlp")
  data = fjt.load_dataset(config.data)
  model = fjt.create_model(config.model)
  tx = fjt.create_optimizer(config.optimizer, total_steps=30)
  averaging = TemporalAveraging(ema_decay=0.9, swa_start=2, swa_every=3)
  state = fjt.create_train_state(model, tx, data.train["x"][:1], jax.random.PRNGKey(0), averaging)
  initial = jax.device_get(state.variables)
  step_fn = fjt.make_train_step(model, tx, averaging=averaging)
  history = []
  for step in range(9):
    state, _ = step_fn(state, fjt.get_batch(data.train, 0, step, 32))
    history.append(jax.device_get(state.variables))
  ema = initial
  for variables in history:
    ema = jax.tree.map(lambda e, w: np.float32(0.9) * e + np.float32(0.1) * w, ema, variables)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               state.averages["ema"], ema)
  taken = [history[s - 1] for s in (2, 5, 8)]  # Steps start, start + every, ...
  swa = jax.tree.map(lambda *ws: np.mean(ws, axis=0), *taken)
  assert int(state.averages["swa_count"]) == 3
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               state.averages["swa"], swa)
  metrics = fjt.evaluate(fjt.make_eval_step(model), state, data.test, 512)
  assert {"ema_accuracy", "swa_accuracy", "ema_loss", "swa_loss"} <= set(metrics)
