"""Where the benchmarks run: PyTorch (the baselines' library) and its device, matmul precision,
CPU threads, the machine's description, and fresh processes for rows that need their own."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence

import jax

# The repository root (for ``import fjt``) and the scripts folder (for ``import benchmarks``).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(ROOT, "scripts")


def require_torch():
  """Imports PyTorch, the baselines' library, or raises ImportError saying what to install."""
  from fjt.interop.torch import import_torch
  return import_torch("the benchmarks compare against PyTorch, which is not installed")


def torch_device():
  """Where the PyTorch baselines run: on the GPU when jax runs on one and PyTorch sees one (the
  same GPU, device 0 of both), else on the CPU."""
  torch = require_torch()
  if jax.default_backend() == "gpu" and torch.cuda.is_available():
    return torch.device("cuda", 0)
  return torch.device("cpu")


def full_float32() -> str:
  """Makes jax and PyTorch multiply float32 matrices in float32 (a GPU's tensor cores would
  round the inputs to TF32 by default in jax, in PyTorch's convolutions too), so that both
  contenders and the peak do the same arithmetic; returns a note saying so. CPUs compute in
  float32 anyway."""
  torch = require_torch()
  jax.config.update("jax_default_matmul_precision", "highest")
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  return "float32 matmuls and convolutions in full float32 precision (no TF32) in jax and PyTorch"


def runs_on() -> str:
  """Where the contenders run, for the notes: ``"2 CPU threads"`` or the GPU's name."""
  if jax.default_backend() == "cpu":
    return f"{cpu_threads()} CPU threads"
  return jax.devices()[0].device_kind


def cpu_threads() -> int:
  """CPUs this process may run on: the threads of XLA's CPU pool, and of PyTorch here."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not Linux.
    return os.cpu_count() or 1


def machine() -> dict[str, str]:
  """CPU model, threads, date and library versions, for the table's header."""
  torch = require_torch()
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      found = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
    model = found.group(1).strip() if found else model
  except OSError:
    pass
  info = {"cpu": model, "threads": str(cpu_threads()), "date": datetime.date.today().isoformat(),
          "jax": jax.__version__, "torch": torch.__version__, "backend": jax.default_backend()}
  if jax.default_backend() != "cpu":
    info["device"] = jax.devices()[0].device_kind
  return info


def in_fresh_process(function: str, args: Sequence[object], env: Mapping[str, str] | None = None
                     ) -> object:
  """Calls ``function`` (``"benchmarks.module.name"``) with the JSON-able ``args`` in a fresh
  Python on the CPU (``JAX_PLATFORMS=cpu``, plus ``env``) and returns what it returned, through
  JSON: for rows about a process's own memory or its own number of devices."""
  module, name = function.rsplit(".", 1)
  code = (f"import json, sys; from {module} import {name}; "
          f"print(json.dumps({name}(*json.loads(sys.argv[1]))))")
  path = os.pathsep.join([ROOT, SCRIPTS, os.environ.get("PYTHONPATH", "")])
  full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {}), "PYTHONPATH": path}
  done = subprocess.run([sys.executable, "-c", code, json.dumps(list(args))], capture_output=True,
                        text=True, env=full_env, check=False)
  if done.returncode != 0:
    raise RuntimeError(f"{function} failed in its subprocess:\n{done.stderr[-2000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])
