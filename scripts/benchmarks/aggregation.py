"""The aggregation rows: GB/s of ``fjt.aggregate.mean`` against a copy of the same bytes and a
PyTorch loop over state_dicts; and the random float32 models that the stream and checkpoint
rows use too."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.machine import cpu_threads, require_torch, runs_on, torch_device
from benchmarks.rows import MB, PyTree, Row, Sizes
from benchmarks.timing import blocked, take_turns, torch_synced


def model_tree(nbytes: int, seed: int, layers: int = 16, width: int = 1024) -> dict[str, Any]:
  """A float32 model of about ``nbytes`` as numpy arrays: ``layers`` Dense layers with kernel
  ``(rows, width)`` and bias ``(width,)``, values normal(0, 1) from ``seed``."""
  rows = max(1, nbytes // (layers * width * 4))
  rng = np.random.default_rng(seed)
  return {f"Dense_{i}": {"kernel": rng.standard_normal((rows, width), np.float32),
                         "bias": rng.standard_normal(width, np.float32)} for i in range(layers)}


def tree_bytes(tree: PyTree) -> int:
  return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def _torch_loop_mean(state_dicts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """The seed's mean as a PyTorch user writes it over state_dicts."""
  n = len(state_dicts)
  return {key: sum(sd[key] for sd in state_dicts) / n for key in state_dicts[0]}


def aggregate_rows(sizes: Sizes, progress: Callable[[str], None] = print) -> list[Row]:
  """``aggregate_vs_memcpy`` and ``aggregate_vs_torch_loop``: GB/s (N inputs read, one output
  written) of ``fjt.aggregate.mean`` over ``sizes.models`` trees of ``sizes.model_bytes``."""
  from fjt import aggregate
  from fjt.tree import flatten

  torch = require_torch()
  torch.set_num_threads(cpu_threads())
  device = torch_device()
  hosts = [model_tree(sizes.model_bytes, seed) for seed in range(sizes.models)]
  trees = [jax.device_put(tree) for tree in hosts]
  # On a CPU the state_dicts share the numpy arrays' memory: the loop only reads them.
  state_dicts = [{k: torch.from_numpy(v).to(device) for k, v in flatten(tree).items()}
                 for tree in hosts]
  model_bytes = tree_bytes(hosts[0])
  leaves = jax.tree.leaves(hosts[0])
  copy_tree = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))
  into = [np.empty_like(leaf) for leaf in leaves]

  def copy_into() -> None:
    for dst, src in zip(into, leaves):
      np.copyto(dst, src)

  read_all = jax.jit(lambda trees: [jnp.sum(x) for x in jax.tree.leaves(trees)])
  contenders = {
      "fjt mean": blocked(lambda: aggregate.mean(trees)),
      "read inputs": blocked(lambda: read_all(trees)),
      "torch loop": torch_synced(lambda: _torch_loop_mean(state_dicts)),
      "copy jax": blocked(lambda: copy_tree(trees[0])),
      "copy torch": torch_synced(lambda: [t.clone() for t in state_dicts[0].values()]),
  }
  on_cpu = jax.default_backend() == "cpu"
  if on_cpu:  # Host copies are the memcpy of a CPU only.
    contenders["copy numpy"] = lambda: [np.copy(leaf) for leaf in leaves]
    contenders["copy into existing numpy"] = copy_into
  times = take_turns(contenders, sizes.repeats)
  moved = (sizes.models + 1) * model_bytes
  mean_rate = moved / times["fjt mean"] / 1e9
  copies = {k: 2 * model_bytes / times[k] / 1e9
            for k in ("copy numpy", "copy jax", "copy torch") if k in times}
  best = max(copies, key=copies.get)
  mb = model_bytes / MB
  notes = (f"mean of {sizes.models} float32 models of {mb:.0f} MB on {runs_on()}, (N + 1) x "
           f"model bytes per call; baseline: allocating copy of one model (read + write), best "
           "of " + ", ".join(f"{k.split()[1]} {v:.1f}" for k, v in copies.items()) +
           " GB/s; the mean allocates its output too")
  if on_cpu:
    into_rate = 2 * model_bytes / times["copy into existing numpy"] / 1e9
    notes += (f". A copy into an existing buffer (no page faults) runs at {into_rate:.1f} GB/s: "
              f"ratio {mean_rate / into_rate:.2f} against it")
  rows = [
      Row("aggregate_vs_memcpy", mean_rate, copies[best], "GB/s", ">= 0.9", notes),
      Row("aggregate_vs_torch_loop", mean_rate, moved / times["torch loop"] / 1e9, "GB/s", ">= 5",
          "baseline: {k: sum(sd[k] for sd in state_dicts) / N} over PyTorch state_dicts of the "
          f"same arrays; fjt {times['fjt mean']:.3f} s, PyTorch {times['torch loop']:.3f} s. "
          f"Roofline: only reading the N inputs (a jitted sum) takes {times['read inputs']:.3f} s "
          f"({sizes.models * model_bytes / times['read inputs'] / 1e9:.1f} GB/s), so no mean can "
          f"beat the loop by more than {times['torch loop'] / times['read inputs']:.1f}x here"),
  ]
  progress(f"{rows[0].name}, {rows[1].name}: {rows[0].ratio:.2f}, {rows[1].ratio:.2f}")
  return rows
