"""``merge_ties_vs_memcpy``: TIES-merging three GPT-2-124M-shaped fine-tunes of a base, in GB/s
of inputs read, against a copy of one model (read + write bytes per second), as
``aggregate_vs_memcpy`` counts it."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.aggregation import tree_bytes
from benchmarks.machine import runs_on
from benchmarks.rows import MB, Row, Sizes
from benchmarks.timing import blocked, take_turns


def gpt2_shaped(layers: int, width: int, vocab: int, block: int, seed: int, scale: float = 1.0
                ) -> dict:
  """Random float32 leaves with GPT-2's shapes (wte, wpe, per block ln/attn/mlp, ln_f)."""
  rng = np.random.default_rng(seed)
  leaf = lambda *shape: (scale * rng.standard_normal(shape, np.float32)).astype(np.float32)
  block_tree = lambda: {
      "ln_1": {"scale": leaf(width), "bias": leaf(width)},
      "attn": {"c_attn": {"kernel": leaf(width, 3 * width), "bias": leaf(3 * width)},
               "c_proj": {"kernel": leaf(width, width), "bias": leaf(width)}},
      "ln_2": {"scale": leaf(width), "bias": leaf(width)},
      "mlp": {"c_fc": {"kernel": leaf(width, 4 * width), "bias": leaf(4 * width)},
              "c_proj": {"kernel": leaf(4 * width, width), "bias": leaf(width)}}}
  return {"wte": leaf(vocab, width), "wpe": leaf(block, width),
          **{f"h_{i}": block_tree() for i in range(layers)},
          "ln_f": {"scale": leaf(width), "bias": leaf(width)}}


def merge_rows(sizes: Sizes, progress: Callable[[str], None] = print) -> list[Row]:
  """``merge_ties_vs_memcpy``: ``fjt.aggregate.ties`` (density 0.2) of three fine-tunes of a
  base, all ``sizes.merge_gpt2``-shaped (layers, width, vocab, block); GB/s of the four inputs
  read against the best allocating copy of one model."""
  from fjt import aggregate

  layers, width, vocab, block = sizes.merge_gpt2
  base = gpt2_shaped(layers, width, vocab, block, 0)
  tuned = [jax.tree.map(np.add, base, gpt2_shaped(layers, width, vocab, block, s, 0.01))
           for s in (1, 2, 3)]
  base, tuned = jax.device_put(base), [jax.device_put(t) for t in tuned]
  model_bytes = tree_bytes(base)
  copy_tree = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))
  leaves = jax.tree.leaves(jax.device_get(base))
  contenders = {"ties": blocked(lambda: aggregate.ties(base, tuned, density=0.2)),
                "copy jax": blocked(lambda: copy_tree(base))}
  if jax.default_backend() == "cpu":
    contenders["copy numpy"] = lambda: [np.copy(leaf) for leaf in leaves]
  times = take_turns(contenders, min(sizes.repeats, 3))
  rate = 4 * model_bytes / times["ties"] / 1e9
  copies = {k: 2 * model_bytes / times[k] / 1e9 for k in ("copy numpy", "copy jax") if k in times}
  best = max(copies, key=copies.get)
  row = Row("merge_ties_vs_memcpy", rate, copies[best], "GB/s", ">= 0.3",
            f"fjt.aggregate.ties(base, 3 fine-tunes, density=0.2) of {model_bytes / MB:.0f} MB "
            f"float32 GPT-2-shaped trees {sizes.merge_gpt2} on {runs_on()}: "
            f"{times['ties']:.2f} s, 4 x model bytes read per call (exact top-k without a sort: "
            "per leaf, about 5 counting passes, each one fused reduction over the base and all "
            "three models at a few thresholds guessed from a sample, then from the counts, and "
            "one per-row count pass splitting ties by index; then sign election and disjoint "
            "mean in one fused pass; one jitted program, after the inputs' finite checks); "
            "baseline: allocating copy "
            "of one model (read + write), best of " + ", ".join(
                f"{k.split()[1]} {v:.1f}" for k, v in copies.items()) + " GB/s")
  progress(f"{row.name}: {row.ratio:.2f}")
  return [row]
