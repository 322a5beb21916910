import json
import os
import signal
import subprocess
import sys
import time

import jax
import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
from accelerator_check import parts as check_parts  # noqa: E402

SCRIPT = os.path.join(ROOT, "scripts", "check_accelerator.py")
# One fast test: the suite itself is not what these tests check.
ONE_TEST = "tests/test_models.py::test_nnlm_has_the_seed_word_embedding"


def read_report(out) -> dict:
  with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
    return json.load(f)


def test_quick_run_reports_every_part(tmp_path):
  pytest.importorskip("torch")  # The bench part's baselines.
  done = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path), "--quick", "--budget_s",
                         "600", "--tests", ONE_TEST], capture_output=True, text=True, timeout=700)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  report = read_report(tmp_path)
  parts = report["parts"]
  assert report["finished"] and list(parts) == list(check_parts.PARTS)
  assert {name: part["status"] for name, part in parts.items()} == dict.fromkeys(parts, "ok")
  assert all(part["seconds"] > 0 for part in parts.values())

  device = parts["device"]["results"]
  assert device["platform"] == jax.default_backend()
  assert device["device_count"] == jax.device_count()
  assert device["versions"]["jax"] == jax.__version__
  assert device["host_memory"]["available_bytes"] > 0

  tests = parts["tests"]["results"]
  assert (tests["passed"], tests["failed"], tests["errors"]) == (1, 0, 0), tests

  rows = parts["bench"]["results"]["rows"]
  assert [r["name"] for r in rows] == [
      "ckpt_save_blocking_vs_torch_save", "ckpt_save_total_vs_torch_save",
      "ckpt_save_total_vs_orbax_save", "ckpt_restore_vs_torch_load",
      "ckpt_restore_vs_orbax_restore", "ckpt_orbax_restore_vs_bytes", "ckpt_verify_vs_restore",
      "stream_average_peak_rss_models"]
  assert all(r["value"] > 0 and r["target"] and r["met"] in (True, False) for r in rows)

  determinism = parts["determinism"]["results"]
  assert determinism["bitwise_equal"] is True and determinism["leaves"] > 0, determinism
  assert determinism["eval"][0] == determinism["eval"][1]

  md = (tmp_path / "report.md").read_text()
  for name in check_parts.PARTS:
    assert f"## {name}: ok" in md
  assert "| ckpt_verify_vs_restore |" in md and "bitwise equal" in md


def test_a_run_stopped_after_the_first_part_keeps_its_results(tmp_path):
  # Stopped as a job's time limit stops it (SIGTERM), inside the tests part (a test file that
  # takes a while).
  proc = subprocess.Popen([sys.executable, SCRIPT, "--out", str(tmp_path), "--quick", "--tests",
                           "tests/test_logs.py"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
      if (tmp_path / "report.json").exists() and read_report(tmp_path)["parts"]["tests"][
          "status"] == "running":  # The device part is done and written.
        break
      time.sleep(0.2)
    else:
      pytest.fail("the tests part did not start within 120 s")
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 1, output[-3000:]
  report = read_report(tmp_path)
  parts = report["parts"]
  assert parts["device"]["status"] == "ok"
  assert parts["device"]["results"]["platform"] == jax.default_backend()
  assert parts["tests"]["status"] == "failed"
  assert parts["tests"]["error"] == "interrupted by SIGTERM"
  assert parts["bench"]["status"] == parts["determinism"]["status"] == "pending"
  assert "## device: ok" in (tmp_path / "report.md").read_text()


def test_a_part_past_its_timeout_is_killed_and_keeps_what_it_counted(tmp_path):
  slow = tmp_path / "test_slow.py"
  slow.write_text("import time\n\ndef test_fast():\n  pass\n\ndef test_hangs():\n"
                  "  time.sleep(600)\n")
  start = time.monotonic()
  done = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path / "out"), "--parts",
                         "tests", "--budget_s", "30", "--tests", str(slow)],
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
  assert time.monotonic() - start < 60  # Not the test's 600 s.
  parts = read_report(tmp_path / "out")["parts"]
  assert parts["tests"]["status"] == "timeout"
  assert parts["tests"]["results"]["so_far"] == {"passed": 1}
  assert {parts[p]["status"] for p in ("device", "bench", "determinism")} == {"skipped"}


def test_the_parent_reads_junit_and_verbose_outcomes(tmp_path):
  xml = tmp_path / "t.xml"
  xml.write_text(
      '<testsuites><testsuite name="pytest" tests="4">'
      '<testcase classname="tests.test_a" name="test_ok"/>'
      '<testcase classname="tests.test_a" name="test_bad">'
      '<failure message="AssertionError: 1 != 2&#10;more">trace</failure></testcase>'
      '<testcase classname="tests.test_b" name="test_skip"><skipped message="no torch"/>'
      '</testcase>'
      '<testcase classname="tests.test_b" name="test_err"><error message="fixture">x</error>'
      '</testcase></testsuite></testsuites>')
  assert check_parts.junit_results(str(xml)) == {
      "passed": 1, "failed": 1, "errors": 1, "skipped": 1,
      "failing": [{"id": "tests.test_a::test_bad", "reason": "AssertionError: 1 != 2"},
                  {"id": "tests.test_b::test_err", "reason": "fixture"}]}
  log = ("tests/test_a.py::test_ok PASSED [ 50%]\n"
         "[gw0] [ 75%] FAILED tests/test_a.py::test_bad\n"
         "tests/test_b.py::test_skip SKIPPED (no torch) [100%]\n")
  assert check_parts.verbose_counts(log) == {"passed": 1, "failed": 1, "skipped": 1}


@pytest.mark.parametrize("argv", [[], ["--out", "x", "--budget_s", "0"],
                                  ["--out", "x", "--parts", "tset"]])
def test_bad_usage_exits_2(argv):
  done = subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True,
                        timeout=60)
  assert done.returncode == 2 and "error:" in done.stderr
