"""The registry of aggregation rules: one rule registered once, used by lists of trees, by
scripts/average.py, by fjt.merge and by replica rounds; the built-in robust rules in rounds."""

import importlib.util
import inspect
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fjt
import fjt.replicas
from conftest import ROOT
from fjt import aggregate, checkpoint, merge
from fjt.data import splits
from fjt.options import ReplicaOptions
from test_merge import saved_variables  # noqa: F401  (a fixture: three checkpoints on disk)
from test_replicas import replica_config

_spec = importlib.util.spec_from_file_location("average_script",
                                               os.path.join(ROOT, "scripts", "average.py"))
average_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(average_script)


def max_abs(x, w, *, scale=1.0):
  """scale times the value of largest |w_j x_j| per coordinate (a test rule)."""
  i = jnp.argmax(jnp.abs(aggregate.per_row(w, x) * x), axis=0)
  return scale * jnp.take_along_axis(x, i[None], axis=0)[0]


def row(x, w, *, index=0):
  """Row ``index`` of the stacked values: the trained replica itself (a test rule)."""
  del w
  return x[index]


def max_abs_numpy(trees, weights, scale):
  """``max_abs`` of numpy arrays, leaf by leaf."""
  w = np.asarray(weights, np.float32)

  def leaf(*xs):
    x = np.stack([np.asarray(v, np.float32) for v in xs])
    i = np.argmax(np.abs(w.reshape((-1,) + (1,) * (x.ndim - 1)) * x), axis=0)
    return np.float32(scale) * np.take_along_axis(x, i[None], axis=0)[0]

  return jax.tree.map(leaf, *trees)


@pytest.fixture(scope="module", autouse=True)
def test_rules():
  aggregate.register("max_abs")(max_abs)
  aggregate.register("row")(row)
  yield
  for name in ("max_abs", "row", "first_input"):
    aggregate.RULES.pop(name, None)


def assert_equal_trees(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


# --- The registry ------------------------------------------------------------------------------


def test_registry_lists_rules_their_parameters_and_errors():
  assert {"mean", "median", "trimmed_mean", "max_abs"} <= set(aggregate.rule_names())
  assert aggregate.get_rule("trimmed") is aggregate.get_rule("trimmed_mean")
  assert aggregate.get_rule("max_abs").params == {"scale": 1.0}
  assert "max_abs (scale=1.0): scale times the value" in aggregate.describe()
  with pytest.raises(ValueError, match=r"unknown aggregation rule 'nope'; known: \[.*'max_abs', "):
    aggregate.get_rule("nope")
  with pytest.raises(ValueError, match="rule 'max_abs' has no parameter 'trim'; its parameters: "
                                       r"\['scale'\]"):
    aggregate.aggregate_trees("max_abs", [{"w": jnp.zeros(2)}], params={"trim": 0.1})
  with pytest.raises(TypeError, match="reduce must take"):
    aggregate.register("bad")(lambda x: x)


def test_a_rule_on_lists_of_trees_checks_inputs_like_mean():
  rng = np.random.default_rng(0)
  trees = [{"w": rng.standard_normal((4, 3)).astype(np.float32), "step": np.int32(i)}
           for i in range(3)]
  out = aggregate.aggregate_trees("max_abs", trees, [1, 2, 5], params={"scale": 0.5})
  expected = max_abs_numpy([{"w": t["w"]} for t in trees], [1, 2, 5], 0.5)
  np.testing.assert_array_equal(out["w"], expected["w"])
  assert int(out["step"]) == 2  # Integer leaves follow integer_policy ("max").
  with pytest.raises(ValueError, match="input 1 differs from input 0 at w: shape"):
    aggregate.aggregate_trees("max_abs", [trees[0], {"w": np.zeros((4, 2), np.float32),
                                                     "step": np.int32(0)}])
  nan = {"w": np.full((4, 3), np.nan, np.float32), "step": np.int32(0)}
  with pytest.raises(ValueError, match="input 2 has a non-finite value .* at w"):
    aggregate.aggregate_trees("max_abs", trees[:2] + [nan])
  with pytest.warns(UserWarning, match="input 2 at w"):
    skipped = aggregate.aggregate_trees("max_abs", trees[:2] + [nan], on_nonfinite="skip")
  np.testing.assert_array_equal(skipped["w"], max_abs_numpy([t["w"] for t in trees[:2]],
                                                            [1, 1], 1.0))


# --- One rule through the CLI, merge and a replica round ---------------------------------------


def test_registered_rule_in_average_cli_and_merge(tmp_path, saved_variables, capsys):
  _, trees, paths = saved_variables
  weights = [1.0, 2.0, 5.0]
  expected = max_abs_numpy([t["params"] for t in trees], weights, 0.5)
  stats = aggregate.merge_batch_stats([t["batch_stats"] for t in trees], weights)

  out = str(tmp_path / "cli")
  assert average_script.main(["--out", out, *paths, "--method", "max_abs", "--param", "scale=0.5",
                              "--weights", *map(str, weights)]) == 0
  assert "result" in capsys.readouterr().out
  saved = checkpoint.load(out)
  assert_equal_trees(saved["params"], expected)
  assert_equal_trees(saved["batch_stats"], jax.device_get(stats))

  result = merge.average_checkpoints(paths, str(tmp_path / "merge"), weights, method="max_abs",
                                     params={"scale": 0.5}, progress=False)
  assert_equal_trees(result.variables["params"], expected)
  with pytest.raises(ValueError, match=r"method must be one of \[.*'max_abs'.*'greedy'"):
    merge.average_checkpoints(paths, str(tmp_path / "x"), method="nope", progress=False)


def test_average_cli_plugin_registers_rules_before_the_flags(tmp_path, saved_variables,
                                                             monkeypatch, capsys):
  _, trees, paths = saved_variables
  (tmp_path / "my_rules.py").write_text(
      "import fjt.aggregate\n\n\n"
      "@fjt.aggregate.register('first_input')\n"
      "def first_input(x, w):\n"
      "  '''Input 0's values.'''\n"
      "  return x[0]\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  out = str(tmp_path / "out")
  assert average_script.main(["--plugin", "my_rules", "--out", out, *paths,
                              "--method", "first_input"]) == 0
  assert_equal_trees(checkpoint.load(out)["params"], trees[0]["params"])
  with pytest.raises(SystemExit):
    average_script.main(["--out", str(tmp_path / "o2"), *paths, "--method", "unregistered"])
  assert "invalid choice: 'unregistered'" in capsys.readouterr().err


def tiny_round_setup(num: int):
  """A tiny MLP, its fresh state, one round's batches (N, 2, 16, ...) and example counts."""
  config = replica_config(steps=2)
  data = fjt.load_dataset(config.data).train
  model, tx, state = fjt.create_from_config(config, data["x"][:1])
  shards = splits.dirichlet_split(data["y"], num, alpha=0.5, seed=0, min_size=3)
  batches = splits.replica_batches(data, shards, 0, 0, 2, 16)
  return model, tx, state, batches, np.asarray([len(s) for s in shards], np.float32)


def one_round(setup, server_tx=None, **kwargs):
  model, tx, state, batches, counts = setup
  replicated = fjt.replicas.replicate(state, len(counts), server_tx)
  run_round = fjt.replicas.make_round(model, tx, server_tx, **kwargs)
  return run_round(replicated, batches, counts)[0]


@pytest.fixture(scope="module")
def round4():
  """Four replicas, and their params after one round of local training (before aggregation):
  the rule ``row`` returns them one replica at a time."""
  setup = tiny_round_setup(4)
  trained = [jax.device_get(one_round(setup, aggregate="row", aggregate_params={"index": k})
                            .replicas.params) for k in range(4)]
  return setup, [jax.tree.map(lambda x: x[0], t) for t in trained]


def test_registered_rule_in_a_replica_round(round4):
  setup, trained = round4
  counts = setup[4]
  state = one_round(setup, aggregate="max_abs", aggregate_params={"scale": 0.5})
  got = jax.device_get(state.replicas.params)
  expected = max_abs_numpy(trained, counts, 0.5)
  for k in range(4):  # Broadcast to every replica.
    assert_equal_trees(jax.tree.map(lambda x: x[k], got), expected)
  # BatchNorm statistics are still pooled exactly, whatever the rule of the params.
  mean_state = one_round(setup)
  assert_equal_trees(jax.device_get(state.replicas.batch_stats),
                     jax.device_get(mean_state.replicas.batch_stats))


@pytest.mark.parametrize("rule,params,per_tree", [
    ("median", None, aggregate.median),
    ("trimmed_mean", {"trim": 0.25}, lambda trees: aggregate.trimmed_mean(trees, 0.25)),
])
def test_robust_rules_in_a_round_equal_the_per_tree_functions(round4, rule, params, per_tree):
  setup, trained = round4
  state = one_round(setup, aggregate=rule, aggregate_params=params)
  got = jax.tree.map(lambda x: x[0], jax.device_get(state.replicas.params))
  assert_equal_trees(got, jax.device_get(per_tree(trained)))


def test_robust_rule_on_bf16_pseudo_gradients(round4):
  """With bfloat16 communication the rule aggregates the pseudo-gradients w - w_k as sent."""
  setup, trained = round4
  w = jax.device_get(setup[2].params)
  state = one_round(setup, aggregate="median", communication_dtype="bfloat16")
  sent = [jax.tree.map(lambda a, b: (a - b).astype(jnp.bfloat16), w, t) for t in trained]
  g = aggregate.median(sent)
  expected = jax.tree.map(lambda a, b: a - np.asarray(b, np.float32), w, jax.device_get(g))
  assert_equal_trees(jax.tree.map(lambda x: x[0], jax.device_get(state.replicas.params)),
                     expected)


def test_replicas_aggregate_config_keys():
  config = fjt.load_config(os.path.join(ROOT, "configs", "digits_fedavg.py"))
  opts = ReplicaOptions.from_config(config)
  rule_of = fjt.replicas.aggregation_rule
  assert (opts.aggregate, opts.trim_fraction, rule_of(opts)) == ("mean", 0.1, ("mean", {}))
  config.replicas.update(aggregate="trimmed", trim_fraction=0.25)
  assert rule_of(ReplicaOptions.from_config(config)) == ("trimmed_mean", {"trim": 0.25})
  config.replicas.aggregate = "nope"
  with pytest.raises(fjt.ConfigError, match=r"config key 'replicas.aggregate': unknown aggregation "
                                            r"rule 'nope'; known: \["):
    rule_of(ReplicaOptions.from_config(config))
  config.replicas.update(aggregate="mean", trim_fraction=0.5)
  with pytest.raises(fjt.ConfigError, match="replicas.trim_fraction"):
    ReplicaOptions.from_config(config)
  with pytest.raises(fjt.ConfigError, match="replicas.aggregate"):
    fjt.replicas.make_round(None, None, aggregate="nope")
  assert sys.modules["fjt.replicas"].replica_mean is aggregate.replica_mean


def test_fit_passes_the_configured_rule_to_its_rounds(tmp_path, monkeypatch):
  config = fjt.load_config(os.path.join(ROOT, "configs", "digits_fedavg.py"))
  config.model.features = (16,)
  config.optimizer.warmup_steps = 1
  config.replicas.update(num=4, rounds=1, local_steps=2, baselines=(), aggregate="trimmed",
                         trim_fraction=0.25)
  seen = []
  make_round = fjt.replicas.make_round

  def spy(*args, **kwargs):
    arguments = inspect.signature(make_round).bind(*args, **kwargs).arguments
    seen.append((arguments["aggregate"], arguments["aggregate_params"]))
    return make_round(*args, **kwargs)

  monkeypatch.setattr(fjt.replicas, "make_round", spy)
  fjt.fit(config, str(tmp_path), progress=False)
  assert seen == [("trimmed_mean", {"trim": 0.25})]
