"""Timing contenders fairly: warm-up, turns in a rotated order, medians.

Everything is warmed up (compiled) first; then the contenders of a row take turns, one call each
per round, in an order rotated every round, and each one's median over the rounds is kept.
Taking turns means a background load slows all of them rather than whichever ran at the time;
it cannot undo that such a load slows multi-threaded work (PyTorch's above all) more than
single-threaded work, so the script reports the CPUs other processes kept busy
(``background_load``). Every timed call ends with its work done (``block_until_ready``, files
written, PyTorch's GPU queue synchronized).
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from benchmarks.machine import require_torch, torch_device


class Phases(dict):
  """``{name: seconds}`` that a contender returns when it times its own phases."""


def take_turns(contenders: Mapping[str, Callable[[], Any]], repeats: int,
               warmup: int = 1) -> dict[str, float]:
  """Median seconds of each contender over ``repeats`` rounds in which each runs once.

  A contender is timed as a whole (its result is dropped) unless it returns ``Phases``: then
  those are its times (e.g. a save's blocking part and its total). The result maps each name to
  its median. ``warmup`` untimed rounds go first (compilation, caches, first-touch allocations).
  Each round starts one contender later than the previous, so none always follows the same
  one (what the previous call left in the caches and the allocator matters for memory-bound
  work).
  """
  for _ in range(warmup):
    for fn in contenders.values():
      fn()
  times: dict[str, list[float]] = {}
  names = list(contenders)
  for i in range(repeats):
    for name in names[i % len(names):] + names[:i % len(names)]:
      fn = contenders[name]
      gc.collect()
      start = time.perf_counter()
      result = fn()
      elapsed = time.perf_counter() - start
      phases = result if isinstance(result, Phases) else {name: elapsed}
      del result
      for key, seconds in phases.items():
        times.setdefault(key, []).append(seconds)
  return {key: float(np.median(values)) for key, values in times.items()}


def blocked(fn: Callable[[], Any]) -> Callable[[], None]:
  """``fn`` followed by waiting for its jax results; the result is dropped."""
  def call() -> None:
    jax.block_until_ready(fn())
  return call


def torch_synced(fn: Callable[[], Any]) -> Callable[[], None]:
  """``fn`` followed by waiting for PyTorch's queued GPU work (if any); the result is dropped."""
  torch = require_torch()
  cuda = torch_device().type == "cuda"

  def call() -> None:
    fn()
    if cuda:
      torch.cuda.synchronize()
  return call


def background_load(seconds: float = 1.0) -> float | None:
  """CPUs kept busy by other processes while this one sleeps ``seconds`` (Linux ``/proc/stat``;
  None elsewhere). A busy machine slows multi-threaded contenders most (PyTorch's OpenMP threads
  above all), which no taking of turns can undo, so the table reports it."""
  def busy_jiffies() -> int:
    with open("/proc/stat") as f:
      fields = [int(v) for v in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # All but idle and iowait.

  try:
    before = busy_jiffies()
    time.sleep(seconds)
    return (busy_jiffies() - before) / os.sysconf("SC_CLK_TCK") / seconds
  except (OSError, ValueError):
    return None
