"""The checkpoint rows: ``RunCheckpointer.save`` and ``checkpoint.load`` of a train state against
``torch.save`` and ``torch.load`` of the same arrays, with Orbax alone as the floor."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.aggregation import model_tree, tree_bytes
from benchmarks.machine import require_torch, runs_on, torch_device
from benchmarks.rows import MB, Row, Sizes
from benchmarks.timing import Phases, take_turns, torch_synced


def train_state(nbytes: int, seed: int = 0):
  """A ``TrainState`` of about ``nbytes``: params (half) and their SGD momentum (half), random."""
  import fjt

  params = jax.device_put(model_tree(nbytes // 2, seed))
  tx = fjt.create_optimizer({"name": "sgd", "learning_rate": 0.1, "momentum": 0.9}, 1)
  rng = np.random.default_rng(seed + 1)
  opt_state = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape, np.float32))
                           if a.ndim else a, tx.init(params))
  return fjt.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                        opt_state=opt_state, rng=jax.random.PRNGKey(seed))


def checkpoint_rows(sizes: Sizes, progress: Callable[[str], None] = print) -> list[Row]:
  """``ckpt_save_blocking_vs_torch_save``, ``ckpt_save_total_vs_torch_save``,
  ``ckpt_restore_vs_torch_load`` and ``ckpt_verify_vs_restore`` for a train state of
  ``sizes.state_bytes``."""
  import orbax.checkpoint as ocp

  from fjt import checkpoint
  from fjt.tree import flatten, to_nested_dict

  torch = require_torch()
  device = torch_device()
  state = train_state(sizes.state_bytes)
  nbytes = tree_bytes(state)
  # torch.save of the same arrays, as a state_dict of tensors (copies: torch owns its memory),
  # on the same device as the state.
  state_dict = {k: torch.from_numpy(np.array(v)).to(device)
                for k, v in flatten(to_nested_dict(state)).items()}
  with tempfile.TemporaryDirectory(prefix="fjt-bench-") as tmp:
    torch_path = os.path.join(tmp, "state.pt")
    checkpointer = checkpoint.RunCheckpointer(os.path.join(tmp, "run"), max_to_keep=1)
    steps = iter(range(1, 10**6))

    def fjt_save() -> Phases:
      start = time.perf_counter()
      checkpointer.save(next(steps), state)
      blocking = time.perf_counter() - start
      checkpointer.wait_until_finished()
      return Phases({"fjt save blocking": blocking, "fjt save total": time.perf_counter() - start})

    def torch_save() -> Phases:
      start = time.perf_counter()
      torch.save(state_dict, torch_path)
      saved = time.perf_counter() - start
      with open(torch_path, "rb") as f:  # Orbax (TensorStore) syncs its files to disk.
        os.fsync(f.fileno())
      return Phases({"torch.save": saved, "torch.save + fsync": time.perf_counter() - start})

    def newest() -> str:
      return checkpoint.step_dirs(checkpointer.directory)[-1][1]

    def fjt_restore() -> None:
      jax.block_until_ready(checkpoint.load(newest(), state))

    def fjt_verify() -> None:  # The part of fjt_restore that checks sizes and CRC-32s.
      checkpoint.verify(newest())

    # Orbax alone, the floor under fjt's save and restore: a synchronous save of the same tree
    # with the same options, and a restore of every leaf onto the state's shardings.
    item = to_nested_dict(state)
    abstract = {p: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding)
                for p, a in flatten(item).items()}

    def orbax_save() -> Phases:
      path = os.path.join(tmp, f"orbax-{next(steps)}")
      start = time.perf_counter()
      with ocp.Checkpointer(checkpoint._handler()) as orbax:
        orbax.save(path, args=ocp.args.PyTreeSave(item))
      elapsed = time.perf_counter() - start
      shutil.rmtree(path)
      return Phases({"orbax save": elapsed})

    def orbax_restore() -> None:
      _, item_dir = checkpoint.resolve(newest())
      jax.block_until_ready(checkpoint._restore(newest(), item_dir, abstract))

    try:
      times = take_turns({"fjt save": fjt_save, "torch.save": torch_save,
                          "fjt restore": fjt_restore, "fjt verify": fjt_verify,
                          "torch.load": torch_synced(lambda: torch.load(torch_path,
                                                                         map_location=device)),
                          "orbax save": orbax_save, "orbax restore": orbax_restore},
                         sizes.repeats)
    finally:
      checkpointer.close()
  mb = nbytes / MB
  rows = [
      Row("ckpt_save_blocking_vs_torch_save", times["fjt save blocking"], times["torch.save"], "s",
          "<= 0.1", f"RunCheckpointer.save of a {mb:.0f} MB TrainState on {runs_on()} returning "
          "(the training loop's pause) against torch.save of the same arrays there"),
      Row("ckpt_save_total_vs_torch_save", times["fjt save total"], times["torch.save"], "s",
          "<= 1.5", "until complete on disk: wait_until_finished, manifest (CRC-32 of every "
          "file) included. Orbax fsyncs every file, torch.save does not: torch.save + fsync "
          f"takes {times['torch.save + fsync']:.3f} s, ratio "
          f"{times['fjt save total'] / times['torch.save + fsync']:.2f} against it. Floor: a "
          f"synchronous Orbax save of the same tree with the same options alone takes "
          f"{times['orbax save']:.3f} s, {times['orbax save'] / times['torch.save']:.2f}x torch.save"),
      Row("ckpt_restore_vs_torch_load", times["fjt restore"], times["torch.load"], "s", "<= 1.5",
          "checkpoint.load(step, target) onto the state's arrays (key report included) against "
          "torch.load, the CRC-32 of every file checked first (ckpt_verify_vs_restore). Floor: "
          f"Orbax's restore of the same leaves alone takes {times['orbax restore']:.3f} s, "
          f"{times['orbax restore'] / times['torch.load']:.2f}x torch.load: it reads each array "
          "into a zero-filled numpy buffer, then device_put copies it, two passes where "
          "torch.load makes one"),
      Row("ckpt_verify_vs_restore", times["fjt verify"], times["fjt restore"], "s", "<= 0.5",
          "the integrity check every restore starts with (sizes and CRC-32s of every file "
          f"against the manifest, ranges on all {os.cpu_count()} CPUs) against the whole "
          "checkpoint.load it is part of"),
  ]
  progress(", ".join(f"{r.name}: {r.ratio:.2f}" for r in rows))
  return rows
