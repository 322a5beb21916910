"""Checkpoints other Flax code wrote (issue 24): plain Orbax CheckpointManager folders holding a
flax TrainState (standard and composite items), mis-nested params, params without batch_stats.
Never a load that fills nothing silently."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax.training import train_state

from fjt import checkpoint
from fjt.checkpoint import CheckpointMismatchError
from fjt.data import load_dataset
from fjt.state import create_from_config
from fjt.train import init_from_checkpoint
from tests.conftest import tiny_digits_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def mlp():
  config = tiny_digits_config("mlp")
  x = load_dataset(config.data).train["x"][:1]
  model, _, state = create_from_config(config, x)
  other = jax.tree.map(lambda a: a + 1.0, state.params)  # "Another codebase's" weights.
  return config, model, state, other


def plain_orbax(path, params, composite: bool) -> None:
  """What a plain Flax + Orbax program writes: a flax TrainState (with its optax state) under
  a CheckpointManager, as the standard item or as a composite item 'state'."""
  flax_state = train_state.TrainState.create(apply_fn=None, params=params, tx=optax.adam(1e-3))
  with ocp.CheckpointManager(os.fspath(path)) as manager:
    save = ocp.args.StandardSave(flax_state)
    manager.save(300, args=ocp.args.Composite(state=save) if composite else save)
    manager.wait_until_finished()


@pytest.mark.parametrize("composite", [False, True])
def test_plain_orbax_train_state_is_a_source_for_init_from_and_load(mlp, tmp_path, composite):
  _, _, state, other = mlp
  plain_orbax(tmp_path / "ckpt", other, composite)
  loaded, report = init_from_checkpoint(state, str(tmp_path / "ckpt"))
  n, stats = len(jax.tree.leaves(other)), len(jax.tree.leaves(state.batch_stats))
  # The digits MLP has a BatchNorm; a flax TrainState holds no batch_stats: reported missing.
  assert len(report.loaded) == n and len(report.missing) == stats == 2
  assert report.missing == ["batch_stats/BatchNorm_0/mean", "batch_stats/BatchNorm_0/var"]
  assert report.counts().startswith(f"{n} of {n + stats} leaves loaded, 0 skipped, 2 missing")
  jax.tree.map(np.testing.assert_array_equal, loaded.params, other)
  # With no target: the whole tree, optax's tuples as lists, from the folder or its step.
  tree = checkpoint.load(tmp_path / "ckpt" / "300")
  assert set(tree) == {"step", "params", "opt_state"} and isinstance(tree["opt_state"], list)
  jax.tree.map(np.testing.assert_array_equal, tree["params"], other)


def test_nested_params_are_an_error_naming_both_sides(mlp, tmp_path):
  _, _, state, other = mlp
  checkpoint.save(tmp_path / "nested", {"params": {"params": other}})
  with pytest.raises(CheckpointMismatchError) as error:
    init_from_checkpoint(state, str(tmp_path / "nested"))
  message = str(error.value)
  assert "\n" not in message and "fills none of the target's 6 leaves" in message
  assert "it has params/params/BatchNorm_0/bias, " in message
  assert "where the target has params/BatchNorm_0/bias, " in message
  assert "one level deeper, under 'params/'" in message
  with pytest.raises(CheckpointMismatchError, match="fills none"):  # load(strict=False) too.
    checkpoint.load(tmp_path / "nested", state.variables, strict=False)


def test_init_from_with_mismatched_nesting_exits_2_before_training(mlp, tmp_path):
  _, _, _, other = mlp
  checkpoint.save(tmp_path / "nested", {"params": {"params": other}})
  done = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--config",
       os.path.join(ROOT, "configs", "digits_mlp.py"), "--workdir", str(tmp_path / "run"),
       f"--config.init_from={tmp_path / 'nested'}", "--config.train.steps=3", "--config.optimizer.warmup_steps=1",
       "--config.model.features=(32,)"],
      capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT})
  assert done.returncode == 2, done.stderr
  errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "config key 'init_from'" in errors[0]
  assert "params/params/BatchNorm_0/bias" in errors[0] and "under 'params/'" in errors[0]
  assert not os.path.exists(tmp_path / "run" / "checkpoints" / "3")
  assert not os.path.exists(tmp_path / "run" / "init_from.json")


def test_params_only_file_reports_batch_norm_statistics_missing(mlp, tmp_path):
  _, _, state, _ = mlp  # The digits MLP normalises with a BatchNorm.
  checkpoint.save(tmp_path / "params", state.params)  # Like torch.save(model.state_dict()).
  _, report = init_from_checkpoint(state, str(tmp_path / "params"))
  assert report.missing == ["batch_stats/BatchNorm_0/mean", "batch_stats/BatchNorm_0/var"]
  assert len(report.loaded) == len(jax.tree.leaves(state.params)) == 6
  assert report.counts().startswith("6 of 8 leaves loaded, 0 skipped, 2 missing")


@pytest.mark.parametrize("unbiased", [False, True])
def test_resnet_running_var_update_as_pytorch_when_asked(unbiased):
  """PyTorch updates running_var with the unbiased batch variance, Flax with the biased one:
  after an import, one training step's statistics drift unless ``unbiased_running_var``."""
  torch = pytest.importorskip("torch", reason="compares with PyTorch's BatchNorm")
  from fjt.interop import torch as interop
  from fjt.interop.torch_models import torch_module
  from fjt.models.resnet import ResNet
  model = ResNet(stage_sizes=(1,), widths=(4,), stem="small", stem_width=4, num_classes=3,
                 unbiased_running_var=unbiased)
  x = np.random.default_rng(0).normal(size=(3, 6, 6, 2)).astype(np.float32)
  module = torch_module(model, x.shape[1:])
  variables, report = interop.from_state_dict(module, interop.abstract_variables(model, x[:1]))
  assert report.notes == (interop.BATCH_NORM_NOTE,) and "unbiased" in report.notes[0]
  module.train()
  module(torch.from_numpy(x).permute(0, 3, 1, 2))
  _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  ours = np.asarray(updates["batch_stats"]["BatchNorm_0"]["var"])
  theirs = module.bn1.running_var.detach().numpy()
  np.testing.assert_allclose(np.asarray(updates["batch_stats"]["BatchNorm_0"]["mean"]),
                             module.bn1.running_mean.detach().numpy(), rtol=0, atol=1e-6)
  if unbiased:
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
  else:  # n = 3 * 6 * 6 values per channel: 0.1 * var / (n - 1) apart.
    assert np.abs(ours - theirs).max() > 1e-4
