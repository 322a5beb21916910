"""Every row in order: the groups that ``scripts/bench.py --only`` names, and ``run``."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence

from benchmarks.aggregation import aggregate_rows
from benchmarks.checkpoints import checkpoint_rows
from benchmarks.gpt import gpt2_124m_rows, gpt_train_step_row
from benchmarks.lora import lora_rows
from benchmarks.machine import full_float32, require_torch
from benchmarks.merges import merge_rows
from benchmarks.remat import remat_rows
from benchmarks.rows import FULL, Row, Sizes
from benchmarks.sharded import sharded_state_rows
from benchmarks.stream import stream_average_rows
from benchmarks.train_steps import train_step_rows


ROW_NAMES = ("train_step_mlp_vs_torch", "train_step_mlp_vs_peak", "train_step_cnn_vs_torch",
             "train_step_gpt_vs_torch", "gpt_remat_temp_bytes_vs_plain",
             "gpt_remat_residual_bytes_vs_plain",
             "aggregate_vs_memcpy", "aggregate_vs_torch_loop", "merge_ties_vs_memcpy",
             "stream_average_peak_rss_models",
             "ckpt_save_blocking_vs_torch_save", "ckpt_save_total_vs_torch_save",
             "ckpt_save_total_vs_orbax_save", "ckpt_restore_vs_torch_load",
             "ckpt_restore_vs_orbax_restore", "ckpt_orbax_restore_vs_bytes", "ckpt_verify_vs_restore",
             "sharded_state_bytes_per_device_vs_ideal", "lora_opt_state_bytes_vs_full")
# After the checkpoint rows, where the page cache can be dropped (``Sizes.cold_restore``, root).
COLD_ROW_NAMES = ("ckpt_restore_cold_vs_torch_load_cold",)
# On a GPU, after the train steps' rows (``gpt2_124m_rows``).
GPU_ROW_NAMES = ("train_step_gpt2_124m_vs_torch", "train_step_gpt2_124m_mfu")
GROUPS = ("train", "gpt2", "remat", "aggregate", "stream", "checkpoint", "sharded", "lora")


def run(sizes: Sizes = FULL, cnn_config=None, progress: Callable[[str], None] = print,
        only: Sequence[str] | None = None) -> list[Row]:
  """Every benchmark, in the order of ``ROW_NAMES`` (the CNN row needs ``cnn_config``, the
  digits CNN experiment config; with ``sizes.gpt2``, ``GPU_ROW_NAMES`` follow the train steps'
  rows), or those of the ``GROUPS`` named in ``only``. Sets both
  libraries to full float32 matmuls first (``full_float32``), for the rest of the process."""
  unknown = sorted(set(only or ()) - set(GROUPS))
  if unknown:
    raise ValueError(f"unknown benchmark groups {unknown}: expected some of {list(GROUPS)}")
  require_torch()
  full_float32()
  rows = []
  groups = {"train": ("train steps", lambda: train_step_rows(sizes, cnn_config, progress)
                                      + gpt_train_step_row(sizes, progress)),
            "remat": ("rematerialisation", lambda: remat_rows(sizes, progress)),
            "gpt2": ("GPT-2 124M", lambda: gpt2_124m_rows(sizes, progress) if sizes.gpt2 else []),
            "aggregate": ("aggregation", lambda: aggregate_rows(sizes, progress)
                          + merge_rows(sizes, progress)),
            "stream": ("streaming average", lambda: stream_average_rows(sizes, progress)),
            "checkpoint": ("checkpoints", lambda: checkpoint_rows(sizes, progress)),
            "sharded": ("sharded state", lambda: sharded_state_rows(sizes, progress)),
            "lora": ("LoRA optimizer state", lambda: lora_rows(sizes, progress))}
  chosen = [groups[key] for key in GROUPS if not only or key in only]
  start = time.perf_counter()
  for number, (name, group) in enumerate(chosen, 1):
    progress(f"[{number}/{len(chosen)}] measuring {name} ...")  # Each group takes minutes.
    rows.extend(group())
    gc.collect()
    progress(f"  ({time.perf_counter() - start:.0f} s so far)")
  return rows
