import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np

import fjt
from conftest import ROOT, tiny_digits_config
from fjt import checkpoint, summary

CNN = os.path.join(ROOT, "configs", "digits_cnn.py")
FINETUNE = os.path.join(ROOT, "configs", "digits_finetune.py")


def test_table_of_a_live_model_with_stats():
  variables = {"params": {"Dense_0": {"kernel": jnp.array([[1.0, np.nan], [3.0, 5.0]]),
                                      "bias": jnp.zeros(2, jnp.bfloat16)}},
               "batch_stats": {"BatchNorm_0": {"mean": jnp.ones(3)}}}
  rows = {r.path: r for r in summary.state_table(variables, stats=True, freeze=["Dense_0/bias"])}
  kernel = rows["params/Dense_0/kernel"]
  assert (kernel.key, kernel.collection, kernel.shape, kernel.dtype, kernel.bytes, kernel.status) == \
      ("Dense_0.kernel", "params", (2, 2), "float32", 16, "trainable")
  assert kernel.stats == {"mean": 3.0, "std": np.std([1.0, 3.0, 5.0]), "min": 1.0, "max": 5.0,
                          "nonfinite": 1}
  assert rows["params/Dense_0/bias"].status == "frozen" and rows["params/Dense_0/bias"].bytes == 4
  assert rows["batch_stats/BatchNorm_0/mean"].key == "BatchNorm_0.mean"
  totals = summary.totals(list(rows.values()))
  assert totals["params"] == {"leaves": 2, "elements": 6, "bytes": 20, "trainable": 4, "frozen": 2}
  assert totals["total"] == {"leaves": 3, "elements": 9, "bytes": 32}
  text = summary.format_table(list(rows.values()))
  assert "Dense_0.kernel" in text and "4 trainable, 2 frozen" in text


def test_table_of_a_config_and_of_its_checkpoint_agree(tmp_path):
  from_config = summary.state_table(CNN)
  assert any(r.path == "params/Conv_0/kernel" and r.shape == (3, 3, 1, 32) for r in from_config)
  config = fjt.load_config(CNN)
  _, _, state = fjt.create_from_config(config, np.zeros((1, 8, 8, 1), np.float32))
  checkpoint.save(tmp_path / "c", state)
  from_disk = summary.state_table(str(tmp_path / "c"))
  strip = lambda rows: [(r.path, r.shape, r.dtype, r.bytes) for r in rows]
  assert strip(from_disk) == strip(from_config) == strip(summary.state_table(state))
  assert summary.diff(str(tmp_path / "c"), CNN) == checkpoint.LoadReport([], [], [], [], {})


def test_finetune_config_marks_the_frozen_body():
  rows = summary.state_table(FINETUNE)
  status = {r.path: r.status for r in rows if r.collection == "params"}
  assert status["params/Dense_1/kernel"] == "trainable"
  assert {s for p, s in status.items() if not p.startswith("params/Dense_1/")} == {"frozen"}


def test_diff_and_cli(tmp_path):
  config = tiny_digits_config("mlp")
  _, _, state = fjt.create_from_config(config, np.zeros((1, 64), np.float32))
  checkpoint.save(tmp_path / "c", state.variables)
  report = summary.diff(str(tmp_path / "c"), CNN)
  # The MLP's Dense_0 (64 -> 32) and Dense_1 (32 -> 10) exist in the CNN with other shapes; its
  # BatchNorm_0 has 32 features like the CNN's first BatchNorm; the CNN has more.
  assert report.mismatched == ["params/Dense_0/bias", "params/Dense_0/kernel", "params/Dense_1/kernel"]
  assert report.unexpected == [] and "params/Conv_0/kernel" in report.missing
  assert report.details["params/Dense_1/kernel"] == "checkpoint (32, 10) float32, target (128, 10) float32"
  script = os.path.join(ROOT, "scripts", "summary.py")
  result = subprocess.run([sys.executable, script, str(tmp_path / "c"), "--stats"],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert "params/Dense_0/kernel" in result.stdout and "nonfinite" in result.stdout
  result = subprocess.run([sys.executable, script, str(tmp_path / "nope")], capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 2 and result.stderr.startswith("error: no checkpoint at")
