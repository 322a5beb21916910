"""scripts/convert.py on a real run: fjt -> .pt -> PyTorch gives the same outputs, and back."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fjt  # noqa: E402
from conftest import ROOT, tiny_digits_config  # noqa: E402
from fjt import checkpoint  # noqa: E402
from fjt.interop.torch_models import torch_module  # noqa: E402

CONVERT = os.path.join(ROOT, "scripts", "convert.py")


def test_convert_a_trained_cnn_both_ways(tmp_path):
  config = tiny_digits_config("cnn", steps=30)
  config.model.dense_features = (32,)  # The shape of the PyTorch twin in test_interop_torch.
  state, summary = fjt.fit(config, str(tmp_path / "run"), progress=False)
  config_file = tmp_path / "config.py"
  config_file.write_text("import ml_collections\n\ndef get_config():\n  return ml_collections."
                         f"ConfigDict({config.to_dict()!r})\n")
  convert = lambda *args: subprocess.run([sys.executable, CONVERT, *map(str, args)],
                                         capture_output=True, text=True, timeout=120)
  result = convert(tmp_path / "run", tmp_path / "cnn.pt", "--config", config_file)
  assert result.returncode == 0, result.stderr

  model = fjt.create_model(config.model)
  test = fjt.load_dataset(config.data).test
  module = torch_module(model, test["x"].shape[1:])
  module.load_state_dict(torch.load(tmp_path / "cnn.pt", weights_only=True), strict=True)
  module.eval()
  with torch.no_grad():
    torch_logits = module(torch.from_numpy(test["x"].transpose(0, 3, 1, 2).copy())).numpy()
  fjt_logits = np.asarray(model.apply(state.variables, test["x"], train=False))
  assert np.max(np.abs(torch_logits - fjt_logits)) <= 1e-5
  assert np.mean(torch_logits.argmax(-1) == test["y"]) == summary["eval"]["accuracy"]

  result = convert(tmp_path / "cnn.pt", tmp_path / "back", "--config", config_file)
  assert result.returncode == 0, result.stderr
  assert "unused: ['BatchNorm_0.num_batches_tracked', 'BatchNorm_1.num_batches_tracked']" in result.stdout
  jax.tree.map(np.testing.assert_array_equal, checkpoint.load_variables(tmp_path / "back"),
               jax.device_get(state.variables))
  result = convert(tmp_path / "cnn.pt", tmp_path / "again")
  assert result.returncode == 2 and "needs --config" in result.stderr


@pytest.mark.parametrize("name, x", [
    ("mlp", np.random.default_rng(0).random((5, 64), np.float32)),
    ("nnlm", np.random.default_rng(0).integers(0, 50, (5, 3)).astype(np.int32)),
])
def test_torch_twins_of_mlp_and_nnlm(name, x):
  from fjt.interop.torch import to_state_dict, to_torch
  model = {"mlp": fjt.MLP(features=(16, 8), num_classes=4),
           "nnlm": fjt.NNLM(vocab_size=50, embed_dim=6, hidden=8)}[name]
  variables = fjt.init_variables(model, x[:1], jax.random.PRNGKey(0))
  # Non-trivial running statistics.
  _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
  module = torch_module(model, x.shape[1:])
  module.load_state_dict(to_torch(to_state_dict(jax.device_get(variables))), strict=True)
  module.eval()
  with torch.no_grad():
    torch_out = module(torch.from_numpy(x).long() if name == "nnlm" else torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(torch_out, model.apply(variables, x, train=False), atol=1e-5, rtol=0)
