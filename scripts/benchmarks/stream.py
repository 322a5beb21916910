"""The streaming-average row: peak memory of averaging checkpoints on disk, in units of one
model, measured in a fresh process."""

from __future__ import annotations

import gc
import os
import re
import tempfile
from collections.abc import Callable, Sequence

import jax.numpy as jnp

from benchmarks.aggregation import model_tree, tree_bytes
from benchmarks.machine import in_fresh_process
from benchmarks.rows import MB, Row, Sizes


def _rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
  # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork and exec, so a child
  # would report its parent's RSS (the benchmark process holds gigabytes by then).
  with open("/proc/self/status") as f:
    return int(re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def stream_average_memory(paths: Sequence[str], out: str) -> dict[str, int]:
  """Runs ``fjt.merge.average_checkpoints(paths, out)`` and returns ``{"before": RSS bytes
  before it, "peak": peak RSS bytes while it ran}``. Meant for a fresh process (``python -c``);
  Linux only (``/proc``): the peak (VmHWM) is reset to the current RSS first."""
  from fjt import merge

  jnp.zeros(1).block_until_ready()  # The backend is up before "before".
  gc.collect()
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # Resets VmHWM to the current RSS.
  before = _rss_bytes()
  merge.average_checkpoints(paths, out, progress=False)
  return {"before": before, "peak": _peak_rss_bytes()}


def stream_average_rows(sizes: Sizes, progress: Callable[[str], None] = print) -> list[Row]:
  """``stream_average_peak_rss_models``: peak memory added by averaging ``sizes.models``
  checkpoints on disk, in a fresh process, in units of one model."""
  from fjt import checkpoint

  with tempfile.TemporaryDirectory(prefix="fjt-bench-") as tmp:
    paths = []
    for seed in range(sizes.models):
      paths.append(os.path.join(tmp, f"model_{seed}"))
      checkpoint.save(paths[-1], {"params": model_tree(sizes.model_bytes, seed)})
    model_bytes = tree_bytes(model_tree(sizes.model_bytes, 0))
    # On the CPU: the row is about host memory, which arrays on a GPU would not show in.
    memory = in_fresh_process("benchmarks.stream.stream_average_memory",
                              [paths, os.path.join(tmp, "out")])
  added = (memory["peak"] - memory["before"]) / MB
  row = Row("stream_average_peak_rss_models", added, model_bytes / MB, "MB", "<= 3",
            f"fjt.merge.average_checkpoints of {sizes.models} checkpoints of {model_bytes / MB:.0f} "
            f"MB in a fresh process on the CPU: peak RSS (VmHWM) minus RSS before "
            f"({memory['before'] / MB:.0f} MB)")
  progress(f"{row.name}: {row.ratio:.2f}")
  return [row]
