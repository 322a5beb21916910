"""Check fjt on whatever JAX finds here (GPU, TPU or the CPU) and write down what was measured.

  python scripts/check_accelerator.py --out DIR [--budget_s S] [--quick]

Parts, in priority order, each in a subprocess of its own under a timeout taken from the budget
left (so a hang or a crash of one part cannot take the report with it):
  device       platform, device kind and count, library versions, free memory
  tests        the pytest suite (pytest-xdist -n where installed and the machine has cores)
  bench        scripts/bench.py's GPU rows: GPT-2 124M against PyTorch, MFU, checkpoints, stream
  determinism  two config.deterministic runs of one config and seed: final params bitwise equal?
DIR/report.json and DIR/report.md are rewritten after every part, so a run cut off at any
moment keeps what the parts before it measured; DIR/<part>.log holds each part's output.
--quick: a few test files, bench's quick mode and a short training run (minutes on a CPU).

exit codes:
  0  every part ran (failing tests or unequal params are results, in the report)
  1  a part failed, timed out, found no budget left or was interrupted
  2  bad usage
"""

from __future__ import annotations

import argparse
import datetime
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
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("device", "tests", "bench", "determinism")
# Shares of the budget left: a part gets remaining * its weight / the weights of the parts left,
# so what an early part does not use goes to the later ones.
WEIGHTS = {"device": 0.05, "tests": 0.45, "bench": 0.35, "determinism": 0.15}
QUICK_TESTS = ("tests/test_models.py", "tests/test_summary.py", "tests/test_logs.py")
BENCH_GROUPS = ("gpt2", "checkpoint", "stream")  # gpt2 has rows on a GPU only.
QUICK_BENCH_GROUPS = ("checkpoint", "stream")  # Bench's quick sizes have no GPT-2 124M.
DETERMINISM_CONFIG = "configs/digits_cnn.py"
MARGIN_S = 15.0  # Of a part's timeout, kept for writing its results after an inner timeout.
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch", "pytest-xdist")


class PartTimeout(Exception):
  """A part's inner command ran out of time; ``results`` is what it measured until then."""

  def __init__(self, results: dict[str, Any]):
    super().__init__("ran out of time")
    self.results = results


class Interrupted(Exception):
  """SIGTERM or SIGINT reached the parent process."""


# --- The parts (each runs in a subprocess: ``--part NAME``) -------------------------------------


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


def run_bounded(cmd: Sequence[str], timeout_s: float, env: dict[str, str] | None = None
                ) -> int | None:
  """Runs ``cmd`` in ``ROOT`` with its output on this process's, in a session of its own (killed
  whole on timeout); returns its exit code, or None when it ran past ``timeout_s``."""
  print("$ " + shlex.join(cmd), flush=True)
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
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
  """pytest-xdist workers for this machine: half its CPUs up to 8, or 0 (no ``-n``) with fewer
  than 4 CPUs or without pytest-xdist."""
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
         *(["-n", str(workers)] if workers else []), *selection]
  results = {"command": shlex.join(cmd), "workers": workers, "selection": selection or "all"}
  save(results)
  with open(log, "w", encoding="utf-8") as out:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
      code = proc.wait(timeout=max(1.0, timeout_s - MARGIN_S))
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
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
  sys.path.insert(0, os.path.join(ROOT, "scripts"))
  from benchmarks.rows import Row

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


# --- The parent: budget, subprocesses, the report ------------------------------------------------


def child_env() -> dict[str, str]:
  """The parts' environment: this checkout's fjt first, JAX's GPU preallocation off (PyTorch's
  baselines and pytest-xdist's workers share the device)."""
  path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
  return {**os.environ, "PYTHONPATH": path, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


def run_part(name: str, args: argparse.Namespace, timeout_s: float
             ) -> tuple[dict[str, Any], str | None]:
  """Runs part ``name`` in a subprocess under ``timeout_s``: its record for the report, and the
  signal's name if SIGTERM or SIGINT interrupted it (the subprocess is killed either way)."""
  part_out = os.path.join(args.out, f".{name}.json")
  if os.path.exists(part_out):
    os.remove(part_out)
  cmd = [sys.executable, os.path.abspath(__file__), "--out", args.out, "--part", name,
         "--part_out", part_out, "--part_timeout_s", f"{timeout_s:.0f}",
         *(["--quick"] if args.quick else []), *(["--tests", *args.tests] if args.tests else []),
         *(["--bench_only", *args.bench_only] if args.bench_only else [])]
  start, code, interrupted = time.monotonic(), None, None
  log = os.path.join(args.out, f"{name}.log")
  with open(log, "w", encoding="utf-8") as f:
    proc = None
    try:
      proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=f, stderr=subprocess.STDOUT,
                              start_new_session=True)
      code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
      pass
    except Interrupted as e:
      interrupted = str(e)
    finally:
      if proc is not None and proc.poll() is None:  # Its whole session: pytest's workers, ...
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
  record = {"status": "failed", "results": None, "error": None}
  if os.path.exists(part_out):  # What the part wrote, up to where it stopped.
    with open(part_out, encoding="utf-8") as f:
      record.update(json.load(f))
  if interrupted:
    record.update(status="failed", error=f"interrupted by {interrupted}")
  elif code is None:
    record.update(status="timeout", error=f"killed after its timeout of {timeout_s:.0f} s")
  elif record["status"] in ("running", "failed") and not record["error"]:
    record.update(status="failed", error=f"exited with code {code}: {last_line(log)}")
  record.update(seconds=round(time.monotonic() - start, 1), timeout_s=round(timeout_s),
                log=f"{name}.log")
  return record, interrupted


def last_line(path: str) -> str:
  """The last non-empty line of a text file (a crash's message), or ``""``."""
  with open(path, encoding="utf-8", errors="replace") as f:
    lines = [line.strip() for line in f if line.strip()]
  return lines[-1][:300] if lines else ""


def render_md(report: dict[str, Any]) -> str:
  """The report as markdown: a status line per part, then each part's results."""
  lines = [f"# fjt accelerator check ({report['started']})", "",
           f"`{report['command']}`: {report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s "
           f"budget{', quick' if report['quick'] else ''}"
           f"{'' if report['finished'] else '; not finished (cut off, or still running)'}.", "",
           "| part | status | seconds | timeout (s) |", "|---|---|---:|---:|"]
  for name, part in report["parts"].items():
    lines.append(f"| {name} | {part['status']} | {part.get('seconds', '')} | "
                 f"{part.get('timeout_s', '')} |")
  for name, part in report["parts"].items():
    lines += ["", f"## {name}: {part['status']}"]
    if part.get("error"):
      lines += ["", f"Error: {part['error']} (see `{part.get('log')}`)"]
    if part.get("results"):
      lines += [""] + RENDERERS[name](part["results"])
  return "\n".join(lines) + "\n"


def _device_md(r: dict[str, Any]) -> list[str]:
  gib = 2.0**30
  lines = [f"- platform: {r['platform']}, {r['device_count']} x {r['device_kind']} "
           f"({r['process_count']} process), {r.get('platform_version')}",
           f"- host: {r['cpu_count']} CPUs, {r['host_memory']['available_bytes'] / gib:.1f} of "
           f"{r['host_memory']['total_bytes'] / gib:.1f} GiB available"]
  lines += [f"- device {m['device']}: {m['free_bytes'] / gib:.1f} of {m['limit_bytes'] / gib:.1f} "
            "GiB free" for m in r["device_memory"]]
  lines.append("- versions: " + ", ".join(f"{k} {v or 'not installed'}"
                                           for k, v in r["versions"].items()))
  if r.get("fjt_import_error"):
    lines.append(f"- **import fjt failed**: {r['fjt_import_error']}")
  return lines


def _tests_md(r: dict[str, Any]) -> list[str]:
  lines = [f"`{r['command']}`", ""]
  if "passed" in r:
    lines.append(f"{r['passed']} passed, {r['failed']} failed, {r['errors']} errors, "
                 f"{r['skipped']} skipped")
    lines += [f"- FAILED `{t['id']}`: {t['reason']}" for t in r["failing"]]
  elif "so_far" in r:
    lines.append("cut off; so far: " + ", ".join(f"{v} {k}" for k, v in r["so_far"].items()))
  return lines


def _bench_md(r: dict[str, Any]) -> list[str]:
  quick = " (quick sizes: a smoke test, not numbers to report)" if r["quick"] else ""
  lines = [f"groups: {', '.join(r['groups'])}{quick}"
           f"{'; cut off in ' + r['timed_out_in'] if r.get('timed_out_in') else ''}", "",
           "| name | value | baseline | unit | ratio | target | met |",
           "|---|---:|---:|---|---:|---|---|"]
  for row in r["rows"]:
    met = {None: "", True: "yes", False: "**no**"}[row["met"]]
    lines.append(f"| {row['name']} | {row['value']:,.4g} | {row['baseline']:,.4g} | {row['unit']} "
                 f"| {row['ratio']:.2f} | {row['target'] or 'report'} | {met} |")
  return lines


def _determinism_md(r: dict[str, Any]) -> list[str]:
  if "bitwise_equal" not in r:
    return [f"cut off in {r.get('timed_out_in')}"]
  verdict = "bitwise equal" if r["bitwise_equal"] else (
      f"**not equal**: {len(r['differing'])} leaves differ (max |diff| {r['max_abs_diff']:.3g}): "
      + ", ".join(r["differing"][:5]))
  return [f"{r['config']}, {r['steps']} steps, seed {r['seed']}, deterministic=True, twice: "
          f"final params and batch statistics ({r['leaves']} leaves) {verdict}",
          f"- final eval: {r['eval'][0]} / {r['eval'][1]}"]


RENDERERS = {"device": _device_md, "tests": _tests_md, "bench": _bench_md,
             "determinism": _determinism_md}


def write_report(report: dict[str, Any], out: str, start: float) -> None:
  """``out/report.json`` and ``out/report.md``, each replaced whole (never half-written)."""
  report["elapsed_s"] = round(time.monotonic() - start, 1)
  for name, text in (("report.json", json.dumps(report, indent=1, default=str)),
                     ("report.md", render_md(report))):
    with open(os.path.join(out, name + ".tmp"), "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))


def check(args: argparse.Namespace) -> int:
  """Runs the chosen parts in order under the budget, writing the report after each."""
  os.makedirs(args.out, exist_ok=True)
  chosen = [p for p in PARTS if p in (args.parts or PARTS)]
  start = time.monotonic()
  report = {"command": shlex.join(["python", "scripts/check_accelerator.py", *sys.argv[1:]]),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "budget_s": args.budget_s, "quick": args.quick, "finished": False,
            "parts": {p: {"status": "pending" if p in chosen else "skipped",
                          "error": None if p in chosen else "not in --parts"} for p in PARTS}}

  def stop(signum, frame):
    raise Interrupted(signal.Signals(signum).name)

  signal.signal(signal.SIGTERM, stop)
  signal.signal(signal.SIGINT, stop)
  name = None
  try:
    write_report(report, args.out, start)
    for i, name in enumerate(chosen):
      left = args.budget_s - (time.monotonic() - start)
      timeout_s = left * WEIGHTS[name] / sum(WEIGHTS[p] for p in chosen[i:])
      if timeout_s < 5:
        report["parts"][name] = {"status": "skipped", "error": "no budget left"}
        continue
      report["parts"][name] = {"status": "running", "timeout_s": round(timeout_s)}
      write_report(report, args.out, start)
      report["parts"][name], interrupted = run_part(name, args, timeout_s)
      write_report(report, args.out, start)
      if interrupted:
        break
  except Interrupted as e:  # Between parts: the part under way (if any) did not finish.
    if name and report["parts"][name]["status"] == "running":
      report["parts"][name].update(status="failed", error=f"interrupted by {e}")
  report["finished"] = True
  write_report(report, args.out, start)
  print(render_md(report))
  return 0 if all(report["parts"][p]["status"] == "ok" for p in chosen) else 1


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="folder for report.json, report.md and logs")
  parser.add_argument("--budget_s", type=float, default=1800.0,
                      help="seconds for all the parts together (default 1800)")
  parser.add_argument("--quick", action="store_true",
                      help="a few test files, bench's quick mode, a short training run")
  parser.add_argument("--parts", nargs="+", choices=PARTS, metavar="PART",
                      help=f"run only these parts (of {', '.join(PARTS)}); the others are skipped")
  parser.add_argument("--tests", nargs="+", metavar="PYTEST_ARG",
                      help="what pytest runs (files, node ids) instead of the whole suite or "
                           "--quick's few files")
  parser.add_argument("--bench_only", nargs="+", metavar="GROUP",
                      help=f"bench groups (default {' '.join(BENCH_GROUPS)}; "
                           f"with --quick {' '.join(QUICK_BENCH_GROUPS)})")
  parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # A subprocess's part.
  parser.add_argument("--part_out", help=argparse.SUPPRESS)
  parser.add_argument("--part_timeout_s", type=float, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.budget_s <= 0:
    parser.error(f"--budget_s must be positive, got {args.budget_s}")
  args.out = os.path.abspath(args.out)
  if args.part:
    return run_part_here(args)
  return check(args)


if __name__ == "__main__":
  sys.exit(main())
