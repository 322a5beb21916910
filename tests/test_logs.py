"""metrics.jsonl is append-only and survives a SIGKILL at any moment of a resume's start-up."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT
from fjt.logs import MetricWriter, keep_rows, read_metrics

ROWS = [{"step": step, "split": "train", "loss": 1.0 / step} for step in range(10, 70, 10)]
TEXT = "".join(json.dumps(r) + "\n" for r in ROWS)


def write_text(path, text):
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


def read_text(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def test_resume_keeps_rows_up_to_its_step_and_appends(tmp_path):
  write_text(tmp_path / "metrics.jsonl", TEXT)
  writer = MetricWriter(str(tmp_path), start_step=30)
  writer.write(40, "train", {"loss": 0.5})
  writer.close()
  assert read_metrics(tmp_path / "metrics.jsonl") == ROWS[:3] + [
      {"step": 40, "split": "train", "loss": 0.5}]


def test_a_torn_last_line_is_dropped(tmp_path):
  path = tmp_path / "metrics.jsonl"
  write_text(path, TEXT + '{"step": 70, "spl')  # A write cut off by a kill.
  assert read_metrics(path) == ROWS
  keep_rows(str(path), 60)
  assert read_text(path) == TEXT
  mtime = os.stat(path).st_mtime_ns
  keep_rows(str(path), 60)  # Nothing to drop: the file is not rewritten.
  assert os.stat(path).st_mtime_ns == mtime


# Start-up of a resumed run's writer in a process that SIGKILLs itself at a chosen moment.
KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from fjt import logs
    workdir, when = sys.argv[1], sys.argv[2]
    def die(*args, **kwargs):
      os.kill(os.getpid(), signal.SIGKILL)
    if when == "before-rename":  # The kept rows are written and synced, not yet in place.
      os.replace = die
    writer = logs.MetricWriter(workdir, start_step=30)
    die()  # "started": after start-up, before the first row is logged.
""")


@pytest.mark.parametrize("when, expected", [("before-rename", TEXT),
                                            ("started", "".join(TEXT.splitlines(True)[:3]))])
def test_sigkill_during_resume_start_up_leaves_metrics_complete(tmp_path, when, expected):
  write_text(tmp_path / "metrics.jsonl", TEXT)
  env = dict(os.environ, PYTHONPATH=ROOT)
  process = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path), when], env=env,
                           capture_output=True, text=True, timeout=120)
  assert process.returncode == -signal.SIGKILL, process.stderr
  assert read_text(tmp_path / "metrics.jsonl") == expected


def test_a_line_that_is_not_a_row_is_set_aside_with_one_warning(tmp_path, capsys):
  path = tmp_path / "metrics.jsonl"
  write_text(path, TEXT + "garbage\n")
  MetricWriter(str(tmp_path), start_step=60).close()
  assert read_text(path) == TEXT
  assert read_text(str(path) + ".damaged") == "garbage\n"
  assert capsys.readouterr().err == (f"fjt: {path}: 1 line(s) that are not metrics rows (first: "
                                     f"line 7) set aside in {path}.damaged\n")
