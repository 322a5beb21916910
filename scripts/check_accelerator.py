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
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from accelerator_check.parts import (BENCH_GROUPS, PARTS, QUICK_BENCH_GROUPS, ROOT,
                                     run_part_here)
from accelerator_check.report import render_md, write_report

# Shares of the budget left: a part gets remaining * its weight / the weights of the parts left,
# so what an early part does not use goes to the later ones.
WEIGHTS = {"device": 0.05, "tests": 0.45, "bench": 0.35, "determinism": 0.15}
MIN_PART_S = 60.0  # Unless less is left: a part's start-up (JAX, a GPU, PyTorch) takes seconds.


class Interrupted(Exception):
  """SIGTERM or SIGINT reached the parent process."""


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
      share = left * WEIGHTS[name] / sum(WEIGHTS[p] for p in chosen[i:])
      timeout_s = max(share, min(MIN_PART_S, left))
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
