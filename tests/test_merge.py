"""Averaging checkpoints on disk: fjt.merge and scripts/average.py."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import fjt
from conftest import ROOT, tiny_digits_config
from fjt import aggregate, checkpoint, merge


@pytest.fixture(scope="module")
def saved_variables(tmp_path_factory):
  """Three tiny MLP variables with distinct params and BatchNorm statistics, on disk."""
  config = tiny_digits_config("mlp")
  directory = tmp_path_factory.mktemp("inputs")
  data = fjt.load_dataset(config.data)
  model = fjt.create_model(config.model)
  trees, paths = [], []
  for seed in range(3):
    variables = fjt.init_variables(model, data.train["x"][:1], jax.random.PRNGKey(seed))
    _, updates = model.apply(variables, data.train["x"][seed * 100:(seed + 1) * 100 + 7 * seed],
                             train=True, mutable=["batch_stats"])
    variables = jax.device_get({"params": variables["params"], "batch_stats": updates["batch_stats"]})
    path = str(directory / f"v{seed}")
    checkpoint.save(path, variables)
    trees.append(variables)
    paths.append(path)
  return config, trees, paths


def test_streaming_average_equals_the_in_memory_aggregate(tmp_path, saved_variables):
  config, trees, paths = saved_variables
  weights = [1.0, 2.0, 5.0]
  result = merge.average_checkpoints(paths, str(tmp_path / "out"), weights, progress=False)
  expected = aggregate.aggregate_variables(trees, weights)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               result.variables, jax.device_get(expected))
  # Saved as a checkpoint that load and init_from read.
  jax.tree.map(np.testing.assert_array_equal, checkpoint.load(tmp_path / "out"), result.variables)
  _, _, state = fjt.create_from_config(config, np.zeros((1, 64), np.float32))
  state, report = fjt.train.init_from_checkpoint(state, str(tmp_path / "out"))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), result.variables["params"])


@pytest.mark.parametrize("method", ["median", "trimmed"])
def test_robust_methods(tmp_path, saved_variables, method):
  _, trees, paths = saved_variables
  result = merge.average_checkpoints(paths, str(tmp_path / "out"), method=method, trim=0.34,
                                     progress=False)
  expected = np.median([t["params"]["Dense_0"]["kernel"] for t in trees], axis=0)
  np.testing.assert_array_equal(result.variables["params"]["Dense_0"]["kernel"], expected)


def test_mismatched_inputs_and_bad_arguments(tmp_path, saved_variables):
  _, trees, paths = saved_variables
  other = str(tmp_path / "other")
  checkpoint.save(other, {"params": {"Dense_0": {"kernel": np.zeros((64, 3), np.float32)}}})
  with pytest.raises(ValueError, match=rf"{other} does not have the variables of {paths[0]}"):
    merge.average_checkpoints([paths[0], other], str(tmp_path / "out"), progress=False)
  with pytest.raises(ValueError, match="got 2 weights for 3 inputs"):
    merge.average_checkpoints(paths, str(tmp_path / "out"), [1, 2], progress=False)
  with pytest.raises(ValueError, match="need a config"):
    merge.average_checkpoints(paths, str(tmp_path / "out"), method="greedy", progress=False)
  with pytest.raises(ValueError, match="exists"):
    merge.average_checkpoints(paths, paths[0], progress=False)


def test_average_cli_prints_the_evaluation_table(tmp_path, saved_variables):
  config, trees, paths = saved_variables
  config_file = tmp_path / "config.py"
  config_file.write_text("import ml_collections\n\ndef get_config():\n  return ml_collections."
                         f"ConfigDict({config.to_dict()!r})\n")
  result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "average.py"), "--out",
                           str(tmp_path / "soup"), *paths, "--config", str(config_file),
                           "--method", "greedy"], capture_output=True, text=True, timeout=180)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert lines[0].split() == ["input", "weight", "loss", "accuracy", "used"]
  assert lines[-1].startswith(str(tmp_path / "soup")) and lines[-1].endswith("result")
  assert len(lines) == 5 and all(line.split()[-1] in ("yes", "no") for line in lines[1:4])


@pytest.fixture
def nan_input(tmp_path, saved_variables):
  """The inputs with the last one replaced by a copy holding a NaN in one kernel."""
  _, trees, paths = saved_variables
  bad = jax.tree.map(np.array, trees[2])
  bad["params"]["Dense_0"]["kernel"][3, 5] = np.nan
  checkpoint.save(tmp_path / "nan", bad)
  return paths[:2] + [str(tmp_path / "nan")]


@pytest.mark.parametrize("method", ["mean", "median", "greedy"])
def test_a_nan_input_is_named_by_its_path(tmp_path, saved_variables, nan_input, method):
  config = saved_variables[0] if method == "greedy" else None
  with pytest.raises(ValueError) as info:
    merge.average_checkpoints(nan_input, str(tmp_path / "out"), method=method, config=config,
                              progress=False)
  assert str(info.value) == (f"{nan_input[2]} has a non-finite value (NaN or Inf) at "
                             "params/Dense_0/kernel")
  assert not os.path.exists(tmp_path / "out")


def test_average_cli_names_a_nan_input_in_one_line(tmp_path, saved_variables, nan_input):
  config, _, _ = saved_variables
  config_file = tmp_path / "config.py"
  config_file.write_text("import ml_collections\n\ndef get_config():\n  return ml_collections."
                         f"ConfigDict({config.to_dict()!r})\n")
  result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "average.py"), "--out",
                           str(tmp_path / "soup"), *nan_input, "--config", str(config_file),
                           "--method", "greedy"], capture_output=True, text=True, timeout=180)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: {nan_input[2]} has a non-finite value (NaN or Inf) at params/Dense_0/kernel")
  assert "Traceback" not in result.stderr and "on_nonfinite" not in result.stderr
