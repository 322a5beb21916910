"""Device meshes, shardings and multi-process start-up.

Parallelism is ``jax.jit`` over ``NamedSharding``s of one ``Mesh``: the global
batch is split over the ``data`` axis, the train state is replicated, and XLA
inserts the cross-device reductions (so BatchNorm statistics are those of the
global batch). Several machines use JAX's own runtime, ``jax.distributed``.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fjt.config import ConfigError

PyTree = Any


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, timeout_s: int = 60) -> None:
  """Joins a multi-process run through ``jax.distributed`` (call before any other JAX use).

  On CPU the cross-process collectives go through gloo. ``timeout_s`` bounds both
  start-up and the detection of a dead peer (the coordination service's heartbeat).
  Arguments left ``None`` come from JAX's environment (``JAX_COORDINATOR_ADDRESS``,
  or a cluster it detects, such as SLURM).
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id, initialization_timeout=timeout_s,
                             heartbeat_timeout_seconds=timeout_s,
                             shutdown_timeout_seconds=timeout_s)


def create_mesh(axes: Mapping[str, int] | None = None, devices=None) -> Mesh:
  """A mesh with named axes and sizes, e.g. ``{"data": -1}`` (-1: all the devices
  the other axes leave). Default: one ``data`` axis over every device."""
  devices = list(jax.devices() if devices is None else devices)
  axes = dict(axes or {"data": -1})
  known = math.prod(size for size in axes.values() if size != -1)
  free = [name for name, size in axes.items() if size == -1]
  if len(free) > 1 or known <= 0 or len(devices) % known:
    raise ConfigError(f"config key 'mesh': cannot lay {dict(axes)} over {len(devices)} devices "
                      "(sizes must divide the device count; at most one -1)")
  if free:
    axes[free[0]] = len(devices) // known
  if math.prod(axes.values()) != len(devices):
    raise ConfigError(f"config key 'mesh': {dict(axes)} uses {math.prod(axes.values())} of the "
                      f"{len(devices)} devices; use -1 for one axis to take the rest")
  return Mesh(np.asarray(devices).reshape(tuple(axes.values())), tuple(axes))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def split(mesh: Mesh, axis: str = "data") -> NamedSharding:
  """Leading array axis split over mesh axis ``axis``, the rest replicated."""
  return NamedSharding(mesh, P(axis))


def put_global(tree: PyTree, sharding: jax.sharding.Sharding) -> PyTree:
  """A host tree (the same on every process) as global arrays laid out by ``sharding``; each
  process places only its own devices' parts."""
  def put(x):
    x = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def put_replicated(tree: PyTree, mesh: Mesh) -> PyTree:
  """A host tree (the same on every process) as global arrays replicated over ``mesh``."""
  return put_global(tree, replicated(mesh))


def process_rows(global_rows: int, mesh: Mesh, axis: str = "data") -> slice:
  """The rows of a global batch split over ``axis`` that this process must supply.

  Devices of the axis are in process order, so each process holds one
  contiguous block; a batch size that does not divide evenly is an error.
  """
  parts = mesh.shape[axis]
  if global_rows % parts:
    raise ConfigError(f"the global batch of {global_rows} rows does not split over the {parts} "
                      f"devices of mesh axis {axis!r}; use a multiple of {parts}")
  per_process = global_rows // jax.process_count()
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


def put_split(local: PyTree, mesh: Mesh, global_rows: int, axis: str = "data") -> PyTree:
  """This process's rows of a global batch (a pytree, see ``process_rows``) as global
  arrays split over ``axis``."""
  sharding = split(mesh, axis)
  return jax.tree.map(lambda v: jax.make_array_from_process_local_data(
      sharding, v, (global_rows, *v.shape[1:])), local)


def needs_lockstep(mesh: Mesh) -> bool:
  """Whether to wait for each step before dispatching the next.

  XLA's CPU collectives between several CPU devices (simulated with
  ``--xla_force_host_platform_device_count``) can deadlock on a few cores when
  several programs are in flight; accelerators keep asynchronous dispatch.
  """
  return mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu"


def to_host(tree: PyTree) -> PyTree:
  """Fetches replicated global arrays (e.g. metrics) to numpy on every process."""
  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)
  return jax.tree.map(fetch, tree)


class Watchdog:
  """Ends the process with a clear error when ``beat()`` is not called for ``timeout_s``.

  A multi-process run whose peer died blocks inside a collective; this thread is
  the bound on how long, whatever the transport does.
  """

  def __init__(self, timeout_s: float, what: str = "a training step"):
    self.timeout_s, self.what = timeout_s, what
    self._last = time.monotonic()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._watch, name="fjt-watchdog", daemon=True)
    self._thread.start()

  def beat(self) -> None:
    self._last = time.monotonic()

  def _watch(self) -> None:
    while not self._stop.wait(min(1.0, self.timeout_s / 4)):
      if time.monotonic() - self._last > self.timeout_s:
        sys.stderr.write(
            f"error: process {jax.process_index()} of {jax.process_count()}: {self.what} made no "
            f"progress for {self.timeout_s:.0f} s (config key 'distributed.timeout_s'); a peer "
            "process has probably died. Exiting.\n")
        sys.stderr.flush()
        os._exit(3)

  def stop(self) -> None:
    self._stop.set()
