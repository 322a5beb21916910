import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

pytest.importorskip("torch")

from fjt import bench  # noqa: E402  (after the skip: the bench needs PyTorch)


def test_quick_bench_writes_every_row(tmp_path):
  out = tmp_path / "bench.json"
  done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench.py"), "--quick",
                         "--out", str(out)], capture_output=True, text=True, cwd=tmp_path,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  # Progress before each long group.
  assert re.search(r"\[1/\d+\] measuring train steps \.\.\.\n", done.stderr)
  rows = json.loads(out.read_text())
  assert [r["name"] for r in rows] == list(bench.ROW_NAMES)
  for row in rows:
    assert {"name", "value", "baseline", "unit", "ratio", "target"} <= set(row), row
    assert row["value"] > 0 and row["baseline"] > 0, row
    assert row["ratio"] == pytest.approx(row["value"] / row["baseline"])
    assert row["target"] is None or row["target"].split()[0] in (">=", "<=")
    assert f"| {row['name']} |" in done.stdout  # The printed table has the row.


def test_targets_read_as_bounds_on_the_ratio():
  assert bench.Row("a", 3.0, 2.0, "GB/s", ">= 1.5").met() is True
  assert bench.Row("a", 2.0, 2.0, "s", "<= 0.5").met() is False
  assert bench.Row("a", 1.0, 2.0, "s", None).met() is None


def test_take_turns_keeps_each_contenders_median_and_phases():
  calls = []
  times = bench.take_turns({"a": lambda: calls.append("a"),
                            "b": lambda: bench.Phases({"b1": 1.0, "b2": 3.0})}, repeats=3)
  assert calls == ["a"] * 4  # One warm-up round, then three timed ones.
  assert set(times) == {"a", "b1", "b2"} and times["b1"] == 1.0 and times["b2"] == 3.0
