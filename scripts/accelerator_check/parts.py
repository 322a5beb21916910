"""The four parts of ``scripts/check_accelerator.py``. Each runs in a subprocess of its own
(``check_accelerator.py --part NAME``), writes its results to a JSON file as it goes
(``run_part_here``) and leaves a ``PartTimeout`` with what it measured when an inner command runs
out of time."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from typing import IO, Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PARTS = ("device", "tests", "bench", "determinism")
QUICK_TESTS = ("tests/test_models.py", "tests/test_summary.py", "tests/test_logs.py")
BENCH_GROUPS = ("gpt2", "remat", "checkpoint", "stream")  # gpt2 has rows on a GPU only.
QUICK_BENCH_GROUPS = ("checkpoint", "stream")  # Bench's quick sizes have no GPT-2 124M.
DETERMINISM_CONFIG = "configs/digits_cnn.py"
MARGIN_S = 15.0  # Of a part's timeout, kept for writing its results after an inner timeout.
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch", "pytest-xdist")


class PartTimeout(Exception):
  """A part's inner command ran out of time; ``results`` is what it measured until then."""

  def __init__(self, results: dict[str, Any]):
    super().__init__("ran out of time")
    self.results = results


def host_memory() -> dict[str, int]:
  """``{"total_bytes", "available_bytes"}`` of the host from ``/proc/meminfo`` (Linux)."""
  with open("/proc/meminfo", encoding="utf-8") as f:
    kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f)}
  return {"total_bytes": kb["MemTotal"] * 1024, "available_bytes": kb["MemAvailable"] * 1024}


def device_part(args: argparse.Namespace, timeout_s: float,
                save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
  """The platform, its devices and their free memory, the host and the library versions."""
  import jax

  devices = jax.devices()
  versions = {}
  for name in LIBRARIES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  memory = []
  for d in devices:
    stats = d.memory_stats() or {}  # None on the CPU.
    if "bytes_limit" in stats:
      memory.append({"device": d.id, "limit_bytes": stats["bytes_limit"],
                     "in_use_bytes": stats.get("bytes_in_use", 0),
                     "free_bytes": stats["bytes_limit"] - stats.get("bytes_in_use", 0)})
  results = {"platform": jax.default_backend(), "device_kind": devices[0].device_kind,
             "device_count": len(devices), "process_count": jax.process_count(),
             "platform_version": getattr(devices[0].client, "platform_version", None),
             "cpu_count": os.cpu_count(), "host_memory": host_memory(),
             "device_memory": memory, "versions": versions}
  try:  # The other parts need fjt: say here when it does not import.
    importlib.import_module("fjt")
  except Exception as e:
    results["fjt_import_error"] = f"{type(e).__name__}: {e}"
  return results


def run_bounded(cmd: Sequence[str], timeout_s: float, stdout: IO[str] | None = None
                ) -> int | None:
  """Runs ``cmd`` in ``ROOT``, its output to ``stdout`` (default: this process's), in a session of
  its own (killed whole on timeout); returns its exit code, or None past ``timeout_s``."""
  print("$ " + shlex.join(cmd), flush=True)
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=stdout,
                          stderr=subprocess.STDOUT if stdout else None, start_new_session=True)
  try:
    return proc.wait(timeout=max(1.0, timeout_s))
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return None


def junit_results(path: str) -> dict[str, Any]:
  """Counts and failing tests (``id``, one-line ``reason``) of a pytest ``--junitxml`` file."""
  root = ET.parse(path).getroot()
  counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
  failing = []
  for case in root.iter("testcase"):
    outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
    key = {"failure": "failed", "error": "errors", "skipped": "skipped"}.get(
        getattr(outcome, "tag", None), "passed")
    counts[key] += 1
    if key in ("failed", "errors"):
      reason = (outcome.get("message") or outcome.text or "").strip().splitlines()
      failing.append({"id": f"{case.get('classname')}::{case.get('name')}",
                      "reason": reason[0][:200] if reason else ""})
  return {**counts, "failing": failing}


def verbose_counts(log: str) -> dict[str, int]:
  """Outcomes counted from ``pytest -v`` lines so far (``PASSED``, ``FAILED``, ...): what a
  session cut off before its junit file was written still says."""
  counts: dict[str, int] = {}
  for line in log.splitlines():
    found = re.search(r"\b(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", line)
    if found and "::" in line:  # A test's line (with -n: "[gw0] [ 5%] PASSED tests/...").
      counts[found.group(1).lower()] = counts.get(found.group(1).lower(), 0) + 1
  return counts


def xdist_workers() -> int:
  """pytest-xdist workers for this machine: half its CPUs up to 8, or 0 (``-n 0``: serial) with
  fewer than 4 CPUs or without pytest-xdist."""
  cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
  if cpus < 4 or importlib.util.find_spec("xdist") is None:
    return 0
  return min(8, cpus // 2)


def tests_part(args: argparse.Namespace, timeout_s: float,
               save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
  """The pytest suite (``--quick``: ``QUICK_TESTS``; ``--tests``: those), counted from its junit
  file, or from its verbose output when it ran out of time."""
  selection = args.tests or (list(QUICK_TESTS) if args.quick else [])
  workers = xdist_workers()
  xml = os.path.join(args.out, "tests.xml")
  log = os.path.join(args.out, "tests-pytest.log")
  cmd = [sys.executable, "-m", "pytest", "-v", "-rfE", "--junitxml", xml,
         *(["-n", str(workers)] if importlib.util.find_spec("xdist") else []),  # 0: serial
         *selection]
  results = {"command": shlex.join(cmd), "workers": workers, "selection": selection or "all"}
  save(results)
  if os.path.exists(xml):  # A previous run's.
    os.remove(xml)
  with open(log, "w", encoding="utf-8") as out:
    code = run_bounded(cmd, timeout_s - MARGIN_S, stdout=out)
  if code is None:
    with open(log, encoding="utf-8", errors="replace") as f:
      raise PartTimeout({**results, "so_far": verbose_counts(f.read())})
  results["pytest_exit_code"] = code
  if not os.path.exists(xml):
    raise RuntimeError(f"pytest exited with code {code} and no junit file; see {log}")
  results.update(junit_results(xml))
  if code not in (0, 1):  # 1: tests failed (a result); 2-5: interrupted, internal error, usage.
    raise RuntimeError(f"pytest exited with code {code} (not a test failure); see {log}")
  return results


def bench_part(args: argparse.Namespace, timeout_s: float,
               save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
  """``scripts/bench.py`` one group at a time (the rows of the groups done survive a timeout),
  with JAX's preallocation off so that PyTorch's baselines find memory on a GPU."""
  from benchmarks.rows import Row  # scripts/ is on sys.path: this runs under a script there.

  groups = args.bench_only or (QUICK_BENCH_GROUPS if args.quick else BENCH_GROUPS)
  deadline = time.monotonic() + timeout_s - MARGIN_S
  results: dict[str, Any] = {"groups": list(groups), "quick": args.quick, "rows": []}
  for group in groups:
    out = os.path.join(args.out, f"bench-{group}.json")
    cmd = [sys.executable, os.path.join("scripts", "bench.py"), "--only", group, "--out", out,
           *(["--quick"] if args.quick else [])]
    code = run_bounded(cmd, deadline - time.monotonic())
    if code is None:
      raise PartTimeout({**results, "timed_out_in": group})
    if code != 0:
      raise RuntimeError(f"scripts/bench.py --only {group} exited with code {code}")
    with open(out, encoding="utf-8") as f:
      for row in json.load(f):
        met = Row(row["name"], row["value"], row["baseline"], row["unit"], row["target"]).met()
        results["rows"].append({**{k: row[k] for k in ("name", "value", "baseline", "unit",
                                                        "ratio", "target")},
                                "met": met, "group": group})
    save(results)
  return results


def train_once(workdir: str, steps: int, timeout_s: float, label: str) -> None:
  """``scripts/train.py`` of ``DETERMINISM_CONFIG`` for ``steps`` steps, deterministic, seed 0,
  into ``workdir`` (``label`` names the run in a timeout's results)."""
  cmd = [sys.executable, os.path.join("scripts", "train.py"), "--config", DETERMINISM_CONFIG,
         "--workdir", workdir, f"--config.train.steps={steps}",
         f"--config.train.eval_every={steps}", f"--config.train.log_every={steps}",
         f"--config.optimizer.warmup_steps={steps // 10}", "--config.deterministic=True",
         "--config.seed=0"]
  code = run_bounded(cmd, timeout_s)
  if code is None:
    raise PartTimeout({"timed_out_in": label})
  if code != 0:
    raise RuntimeError(f"scripts/train.py exited with code {code}")


def determinism_part(args: argparse.Namespace, timeout_s: float,
                     save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
  """Two runs of one config and seed with ``config.deterministic=True``, one after the other;
  whether their final params and batch statistics are bitwise equal, leaf by leaf."""
  import numpy as np

  from fjt.checkpoint import load_variables
  from fjt.tree import flatten

  steps = 20 if args.quick else 300
  deadline = time.monotonic() + timeout_s - MARGIN_S
  with tempfile.TemporaryDirectory(prefix="fjt-determinism-") as tmp:
    runs = []
    for name in ("a", "b"):
      workdir = os.path.join(tmp, name)
      train_once(workdir, steps, (deadline - time.monotonic()) / (2 if name == "a" else 1),
                 f"run {name}")
      with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
      path = os.path.join(workdir, "checkpoints", str(summary["step"]))
      runs.append((summary, flatten(load_variables(path))))
  (summary_a, a), (summary_b, b) = runs
  differing = sorted(p for p in set(a) | set(b)
                     if p not in a or p not in b or a[p].dtype != b[p].dtype
                     or a[p].shape != b[p].shape
                     or np.asarray(a[p]).tobytes() != np.asarray(b[p]).tobytes())
  diffs = [float(np.max(np.abs(np.asarray(a[p], np.float64) - np.asarray(b[p], np.float64))))
           for p in differing if p in a and p in b and a[p].shape == b[p].shape and a[p].size]
  return {"config": DETERMINISM_CONFIG, "steps": steps, "seed": 0,
          "bitwise_equal": not differing, "leaves": len(a), "differing": differing[:20],
          "max_abs_diff": max(diffs, default=0.0),
          "eval": [summary_a["eval"], summary_b["eval"]]}


PART_FUNCTIONS = {"device": device_part, "tests": tests_part, "bench": bench_part,
                  "determinism": determinism_part}


def run_part_here(args: argparse.Namespace) -> int:
  """The child side: runs ``args.part``, writing ``{"status", "results", "error"}`` to
  ``args.part_out`` as it goes (a parent that times this process out reads what is there)."""
  def write(record: dict[str, Any]) -> None:
    with open(args.part_out + ".tmp", "w", encoding="utf-8") as f:
      json.dump(record, f, indent=1, default=str)
    os.replace(args.part_out + ".tmp", args.part_out)

  def save(results: dict[str, Any]) -> None:
    write({"status": "running", "results": results, "error": None})

  try:
    results = PART_FUNCTIONS[args.part](args, args.part_timeout_s, save)
    write({"status": "ok", "results": results, "error": None})
  except PartTimeout as e:
    write({"status": "timeout", "results": e.results, "error": "ran out of its time"})
  except Exception as e:  # Any failure of a part is reported, not raised.
    write({"status": "failed", "results": None, "error": f"{type(e).__name__}: {e}"})
    raise
  return 0
