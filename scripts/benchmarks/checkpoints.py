"""The checkpoint rows: ``RunCheckpointer.save`` and ``checkpoint.load`` of a train state against
``torch.save`` and ``torch.load`` of the same arrays, and against the floors under them measured
in the same run: Orbax's save and restore alone (no fjt work), and reading the checkpoint's bytes
from the page cache."""

from __future__ import annotations

import concurrent.futures
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


def read_files(directory: str) -> int:
  """Reads every file under ``directory`` into new memory, files in parallel threads (as a
  restore reads them); returns the bytes read. From the page cache, the floor of any restore."""
  paths = [os.path.join(d, name) for d, _, names in os.walk(directory) for name in names]

  def read(path: str) -> int:
    buffer = np.empty(os.path.getsize(path), np.uint8)
    with open(path, "rb", buffering=0) as f:
      return f.readinto(buffer)

  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
    return sum(pool.map(read, paths))


def drop_page_cache() -> bool:
  """Writes dirty pages to disk and drops the page cache (Linux, as root); False where this
  process is not permitted to, which leaves the cache as it was."""
  try:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as f:
      f.write("1\n")
    return True
  except OSError:
    return False


def cold(name: str, fn: Callable[[], object]) -> Callable[[], Phases]:
  """``fn`` timed after dropping the page cache (the drop is not timed), as phase ``name``."""
  def call() -> Phases:
    drop_page_cache()
    start = time.perf_counter()
    fn()
    return Phases({name: time.perf_counter() - start})
  return call


def checkpoint_rows(sizes: Sizes, progress: Callable[[str], None] = print) -> list[Row]:
  """``ckpt_save_blocking_vs_torch_save``, ``ckpt_save_total_vs_torch_save``,
  ``ckpt_save_total_vs_orbax_save``, ``ckpt_restore_vs_torch_load``,
  ``ckpt_restore_vs_orbax_restore``, ``ckpt_orbax_restore_vs_bytes`` and
  ``ckpt_verify_vs_restore`` for a train state of ``sizes.state_bytes``."""
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

    def fjt_verify() -> None:  # What fjt_restore checks (sizes and CRC-32s), alone.
      checkpoint.verify(newest())

    def read_bytes() -> None:  # The checkpoint's files from the page cache, nothing decoded.
      read_files(newest())

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
      shutil.rmtree(path)  # Not timed; fjt's save removes its previous step (max_to_keep=1) timed.
      return Phases({"orbax save": elapsed})

    def orbax_restore() -> None:
      _, item_dir = checkpoint.resolve(newest())
      jax.block_until_ready(checkpoint._restore(newest(), item_dir, abstract))

    torch_load = torch_synced(lambda: torch.load(torch_path, map_location=device))
    try:
      times = take_turns({"fjt save": fjt_save, "torch.save": torch_save,
                          "fjt restore": fjt_restore, "fjt verify": fjt_verify,
                          "torch.load": torch_load,
                          "orbax save": orbax_save, "orbax restore": orbax_restore,
                          "bytes": read_bytes},
                         sizes.repeats)
      # From disk: each call after dropping the page cache, where this process may.
      if sizes.cold_restore and drop_page_cache():
        times.update(take_turns({"fjt restore cold": cold("fjt restore cold", fjt_restore),
                                 "torch.load cold": cold("torch.load cold", torch_load),
                                 "orbax restore cold": cold("orbax restore cold", orbax_restore),
                                 "bytes cold": cold("bytes cold", read_bytes)},
                                max(3, sizes.repeats // 3), warmup=0))
    finally:
      checkpointer.close()
  mb = nbytes / MB
  cpus = os.cpu_count()
  rows = [
      Row("ckpt_save_blocking_vs_torch_save", times["fjt save blocking"], times["torch.save"], "s",
          "<= 0.1", f"RunCheckpointer.save of a {mb:.0f} MB TrainState on {runs_on()} returning "
          "(the training loop's pause) against torch.save of the same arrays there"),
      Row("ckpt_save_total_vs_torch_save", times["fjt save total"], times["torch.save"], "s",
          "<= 1.5", "until complete on disk: wait_until_finished, manifest (CRC-32 of every "
          "file) included; the previous step is removed in Orbax's background thread. Orbax fsyncs every file, torch.save does not: torch.save + fsync "
          f"takes {times['torch.save + fsync']:.3f} s, ratio "
          f"{times['fjt save total'] / times['torch.save + fsync']:.2f} against it. Floor: "
          f"ckpt_save_total_vs_orbax_save"),
      Row("ckpt_save_total_vs_orbax_save", times["fjt save total"], times["orbax save"], "s",
          "<= 1.1", "the same save against its floor: a synchronous Orbax save of the same tree "
          f"with the same options alone ({times['orbax save'] / times['torch.save']:.2f}x "
          "torch.save); fjt adds the manifest (CRC-32s of the files just written, read back "
          "from the page cache) and the CheckpointManager's step bookkeeping. The "
          f"CRC-32s alone take about ckpt_verify_vs_restore's {times['fjt verify']:.3f} s: "
          f"Orbax's save plus them is {times['orbax save'] + times['fjt verify']:.3f} s"),
      Row("ckpt_restore_vs_torch_load", times["fjt restore"], times["torch.load"], "s", "<= 2.0",
          "checkpoint.load(step, target) onto the state's arrays (key report and the CRC-32 of "
          "every file included) against torch.load. Floors: ckpt_restore_vs_orbax_restore, "
          f"ckpt_orbax_restore_vs_bytes; reading the bytes alone takes {times['bytes']:.3f} s, "
          f"{times['bytes'] / times['torch.load']:.2f}x torch.load"),
      Row("ckpt_restore_vs_orbax_restore", times["fjt restore"], times["orbax restore"], "s",
          "<= 1.1", "the same restore against its floor: Orbax's restore of the same leaves onto "
          "the same shardings alone, no fjt work (no manifest, no report, no CRC-32s); fjt "
          "checks the CRC-32s before it: "
          f"Orbax's restore then the check alone would take "
          f"{times['orbax restore'] + times['fjt verify']:.3f} s"),
      Row("ckpt_orbax_restore_vs_bytes", times["orbax restore"], times["bytes"], "s", "<= 2.0",
          "Orbax's restore alone against reading the checkpoint's files from the page cache into "
          f"new memory ({cpus} threads, nothing decoded): Orbax allocates a zero-filled numpy "
          "buffer per array and TensorStore copies each chunk it read into it (on a CPU the "
          "device_put after is zero-copy), so the output is touched twice and every page "
          "faulted in, where reading makes one pass. Tried, no measurable change: use_ocdbt=False, "
          "zarr2, restore_concurrent_gb=1"),
      Row("ckpt_verify_vs_restore", times["fjt verify"], times["fjt restore"], "s", "<= 0.5",
          "the integrity check every restore makes (sizes and CRC-32s of every file against the "
          f"manifest; {cpus} threads over the files' mapped pages), alone, against the whole "
          "checkpoint.load, which runs it before Orbax's read"),
  ]
  if "fjt restore cold" in times:
    rows.append(Row(
        "ckpt_restore_cold_vs_torch_load_cold", times["fjt restore cold"],
        times["torch.load cold"], "s", "<= 2.0",
        "the same restore and torch.load from disk, each after dropping the page cache "
        f"(/proc/sys/vm/drop_caches; the disk here is virtual, so its speed varies). Floors from "
        f"disk: Orbax's restore alone {times['orbax restore cold']:.3f} s, reading the files "
        f"{times['bytes cold']:.3f} s"))
  elif sizes.cold_restore:
    progress("ckpt_restore_cold_vs_torch_load_cold: not measured (dropping the page cache "
             "needs root on Linux)")
  progress(", ".join(f"{r.name}: {r.ratio:.2f}" for r in rows))
  return rows
