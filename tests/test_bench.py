import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT

pytest.importorskip("torch")

import fjt  # noqa: E402

# The benchmarks live beside scripts/bench.py, outside the fjt package.
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from benchmarks import gpt, rows as table, suite, timing  # noqa: E402


def test_quick_bench_writes_every_row(tmp_path):
  out = tmp_path / "bench.json"
  done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench.py"), "--quick",
                         "--out", str(out)], capture_output=True, text=True, cwd=tmp_path,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  # Progress before each long group.
  assert re.search(r"\[1/\d+\] measuring train steps \.\.\.\n", done.stderr)
  rows = json.loads(out.read_text())
  assert [r["name"] for r in rows] == list(suite.ROW_NAMES)
  for row in rows:
    assert {"name", "value", "baseline", "unit", "ratio", "target"} <= set(row), row
    assert row["value"] > 0 and row["baseline"] > 0, row
    assert row["ratio"] == pytest.approx(row["value"] / row["baseline"])
    assert row["target"] is None or row["target"].split()[0] in (">=", "<=")
    assert f"| {row['name']} |" in done.stdout  # The printed table has the row.


def test_targets_read_as_bounds_on_the_ratio():
  assert table.Row("a", 3.0, 2.0, "GB/s", ">= 1.5").met() is True
  assert table.Row("a", 2.0, 2.0, "s", "<= 0.5").met() is False
  assert table.Row("a", 1.0, 2.0, "s", None).met() is None


def test_take_turns_keeps_each_contenders_median_and_phases():
  calls = []
  times = timing.take_turns({"a": lambda: calls.append("a"),
                             "b": lambda: timing.Phases({"b1": 1.0, "b2": 3.0})}, repeats=3)
  assert calls == ["a"] * 4  # One warm-up round, then three timed ones.
  assert set(times) == {"a", "b1", "b2"} and times["b1"] == 1.0 and times["b2"] == 3.0


def test_gpt2_rows_run_a_tiny_gpt_and_count_its_flops():
  sizes = dataclasses.replace(table.QUICK, gpt2=(1, 32, 2, 16, 2), gpt2_vocab=100,
                              gpt2_steps=1, repeats=1)
  rows = gpt.gpt2_124m_rows(sizes, progress=lambda line: None)
  # On the CPU there is no bf16 peak to divide by: the speed row alone.
  assert [r.name for r in rows] == ["train_step_gpt2_124m_vs_torch"]
  assert rows[0].value > 0 and rows[0].baseline > 0
  # 6 N + 12 L C T, N without the position embedding: wte 100 x 32, two LayerNorms per block and
  # ln_f (2 x 32 each), c_attn 32 x 96 + 96, attn c_proj 32 x 32 + 32, c_fc 32 x 128 + 128,
  # mlp c_proj 128 x 32 + 32.
  n = 100 * 32 + 3 * 64 + (32 * 96 + 96) + (32 * 32 + 32) + (32 * 128 + 128) + (128 * 32 + 32)
  model = fjt.models.GPT(vocab_size=100, block_size=16, num_layers=1, num_heads=2, embed_dim=32)
  params = fjt.init_variables(model, np.zeros((1, 16), np.int32), jax.random.PRNGKey(0))["params"]
  assert gpt.gpt_flops_per_token(params, 1, 32, 16) == 6 * n + 12 * 1 * 32 * 16
  assert gpt.bf16_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert gpt.bf16_peak_flops("NVIDIA H100 PCIe") == 756e12
  assert gpt.bf16_peak_flops("NVIDIA H200") == 989e12
  assert gpt.bf16_peak_flops("cpu") is None


def test_only_runs_the_named_groups_and_refuses_unknown_ones(tmp_path):
  script = os.path.join(ROOT, "scripts", "bench.py")
  done = subprocess.run([sys.executable, script, "--quick", "--only", "sharded", "--out",
                         str(tmp_path / "b.json")], capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert [r["name"] for r in json.loads((tmp_path / "b.json").read_text())] == [
      "sharded_state_bytes_per_device_vs_ideal"]
  bad = subprocess.run([sys.executable, script, "--only", "trian"], capture_output=True, text=True,
                       timeout=300)
  assert bad.returncode == 2 and "'trian'" in bad.stderr


def test_remat_rows_compare_a_gpt_with_and_without_remat():
  from benchmarks import remat
  sizes = dataclasses.replace(table.QUICK, remat_gpt=(4, 32, 2, 64, 8))
  rows = remat.remat_rows(sizes, progress=lambda line: None)
  assert [r.name for r in rows] == ["gpt_remat_temp_bytes_vs_plain",
                                    "gpt_remat_residual_bytes_vs_plain"]
  assert all(r.value > 0 and r.baseline > 0 for r in rows)
  assert rows[1].met()  # Four blocks keep their inputs only: far fewer residual bytes.
