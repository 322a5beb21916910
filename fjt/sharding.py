"""Device meshes, shardings of the train state and multi-process start-up.

Parallelism is ``jax.jit`` over ``NamedSharding``s of one ``Mesh`` with axes ``data``,
``fsdp`` and ``model``: the global batch is split over ``("data", "fsdp")``; the train state
is replicated over ``data``, split over ``fsdp`` (params, gradients and optimizer state:
ZeRO-3) and over ``model`` (Megatron column/row splits), as the logical axis names on the
parameters (``nn.with_logical_partitioning``) and the rules (logical name -> mesh axis) say.
XLA inserts the collectives (so BatchNorm statistics are those of the global batch). Several
machines use JAX's own runtime, ``jax.distributed``.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

from fjt.config import ConfigError
from fjt.runs import config_changes

PyTree = Any
Rules = Sequence[tuple[str, str | Sequence[str] | None]]

MESH_AXES = ("data", "fsdp", "model")  # Outermost first: ``model`` on the closest devices.
BATCH_AXES = ("data", "fsdp")  # The mesh axes a batch's rows are split over.
FSDP = "fsdp"


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, timeout_s: int = 60) -> None:
  """Joins a multi-process run through ``jax.distributed`` (call before any other JAX use).

  On CPU the cross-process collectives go through gloo. ``timeout_s`` bounds both
  start-up and the detection of a dead peer (the coordination service's heartbeat).
  Arguments left ``None`` come from JAX's environment (``JAX_COORDINATOR_ADDRESS``,
  or a cluster it detects, such as SLURM).
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # The coordination service's own verdict on a dead peer aborts the process with a C++ stack
  # trace; the Watchdog (timeout_s) must speak first, so the heartbeat waits twice as long.
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id, initialization_timeout=timeout_s,
                             heartbeat_timeout_seconds=2 * timeout_s + 10,
                             shutdown_timeout_seconds=timeout_s)


def check_same_config(record: Mapping[str, Any], name: str, timeout_s: float = 60) -> None:
  """Refuses to train when the processes of one run were started with different configs.

  Each process publishes ``record`` (a config as ``fjt.runs.as_record`` makes it) in the
  coordination service's key-value store under ``name`` (e.g. the workdir); process 0 compares
  every other's with its own, the others compare theirs with process 0's, so each process of
  a mismatched run raises ``ConfigError`` naming the differing keys, before any work. A no-op
  in a single-process run.
  """
  if jax.process_count() == 1:
    return
  import json
  from jax._src import distributed
  client, me = distributed.global_state.client, jax.process_index()
  key = lambda i: f"fjt/config/{name}/{i}"
  client.key_value_set(key(me), json.dumps(record, sort_keys=True))
  for other in (range(1, jax.process_count()) if me == 0 else (0,)):
    theirs = json.loads(client.blocking_key_value_get(key(other), int(timeout_s * 1000)))
    first, differs = (record, other) if me == 0 else (theirs, me)  # Process 0's, and which.
    changes = config_changes(first, theirs if me == 0 else record)
    if changes:
      raise ConfigError(
          f"the processes of this run were started with different configs (process {differs} vs "
          "process 0): " + "; ".join(map(str, changes)) + "; start every process with the same "
          "--config and overrides")


def create_mesh(axes: Mapping[str, int] | None = None, devices=None) -> Mesh:
  """A mesh with named axes and sizes, e.g. ``{"data": -1}`` (-1: all the devices
  the other axes leave). Default: one ``data`` axis over every device."""
  devices = list(jax.devices() if devices is None else devices)
  axes = resolve_axes(axes or {"data": -1}, len(devices))
  return Mesh(np.asarray(devices).reshape(tuple(axes.values())), tuple(axes))


def resolve_axes(axes: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """``axes`` with its one -1 (if any) replaced by the devices the others leave; the sizes
  must multiply to ``num_devices`` (a ``ConfigError`` naming ``mesh`` otherwise)."""
  axes = dict(axes)
  known = math.prod(size for size in axes.values() if size != -1)
  free = [name for name, size in axes.items() if size == -1]
  if len(free) > 1 or known <= 0 or num_devices % known:
    raise ConfigError(f"config key 'mesh': cannot lay {dict(axes)} over {num_devices} devices "
                      "(sizes must divide the device count; at most one -1)")
  if free:
    axes[free[0]] = num_devices // known
  if math.prod(axes.values()) != num_devices:
    raise ConfigError(f"config key 'mesh': {dict(axes)} uses {math.prod(axes.values())} of the "
                      f"{num_devices} devices; use -1 for one axis to take the rest")
  return axes


def abstract_mesh(axes: Mapping[str, int], num_devices: int) -> AbstractMesh:
  """The mesh of ``axes`` (``MESH_AXES`` order, -1 as in ``resolve_axes``) over
  ``num_devices`` devices that need not exist: for the layout of a state (shard shapes,
  ``fjt.summary``) without the devices."""
  axes = resolve_axes(_train_axes(axes), num_devices)
  return AbstractMesh(tuple(axes.values()), tuple(axes))


def _train_axes(axes: Mapping[str, int]) -> dict[str, int]:
  """Every axis of ``MESH_AXES``, in that order (missing ones of size 1); others are errors."""
  unknown = sorted(set(axes) - set(MESH_AXES))
  if unknown:
    raise ConfigError(f"config key 'mesh.{unknown[0]}': unknown mesh axis; the axes are {MESH_AXES}")
  return {a: axes.get(a, 1) for a in MESH_AXES}


def create_train_mesh(axes: Mapping[str, int], batch_sizes: Mapping[str, int],
                      devices=None) -> Mesh:
  """The mesh of a training run: axes in ``MESH_AXES`` order (sizes as ``create_mesh``), and
  each of ``batch_sizes`` (``{config key: rows}``) checked to split over ``batch_axes``."""
  mesh = create_mesh(_train_axes(axes), devices)
  names = [a for a in batch_axes(mesh) if mesh.shape[a] > 1] or ["data"]
  parts = math.prod(mesh.shape[a] for a in names)
  where = (f"the {names[0]!r} axis" if len(names) == 1 else
           f"the {' x '.join(repr(a) for a in names)} axes")
  for key, rows in batch_sizes.items():
    if rows % parts:
      raise ConfigError(f"config key {key!r}: {rows} rows do not split over the {parts} devices "
                        f"of {where}; use a multiple of {parts}")
  return mesh


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


Axes = str | Sequence[str]


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The axes of ``BATCH_AXES`` that ``mesh`` has: the ones a batch's rows are split over."""
  return tuple(a for a in BATCH_AXES if a in mesh.shape)


def _axes(axis: Axes | None, mesh: Mesh) -> tuple[str, ...]:
  if axis is None:
    return batch_axes(mesh)
  return (axis,) if isinstance(axis, str) else tuple(axis)


def split(mesh: Mesh, axis: Axes | None = None) -> NamedSharding:
  """Leading array axis split over mesh axis ``axis`` (a name or a tuple of names; default
  ``batch_axes(mesh)``), the rest replicated."""
  axes = _axes(axis, mesh)
  return NamedSharding(mesh, P(axes[0] if len(axes) == 1 else axes))


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


def process_rows(global_rows: int, mesh: Mesh, axis: Axes | None = None) -> slice:
  """The rows of a global batch split over ``axis`` (default ``batch_axes(mesh)``) that this
  process must supply.

  Devices of the axis are in process order, so each process holds one
  contiguous block; a batch size that does not divide evenly is an error.
  """
  axes = _axes(axis, mesh)
  parts = math.prod(mesh.shape[a] for a in axes)
  if global_rows % parts:
    named = repr(axes[0]) if len(axes) == 1 else " x ".join(repr(a) for a in axes)
    raise ConfigError(f"the global batch of {global_rows} rows does not split over the {parts} "
                      f"devices of mesh axis {named}; use a multiple of {parts}")
  per_process = global_rows // jax.process_count()
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


def put_split(local: PyTree, mesh: Mesh, global_rows: int, axis: Axes | None = None) -> PyTree:
  """This process's rows of a global batch (a pytree, see ``process_rows``) as global
  arrays split over ``axis`` (default ``batch_axes(mesh)``)."""
  sharding = split(mesh, axis)
  return jax.tree.map(lambda v: jax.make_array_from_process_local_data(
      sharding, v, (global_rows, *v.shape[1:])), local)


def _rule_axes(name: str | None, rules: Mapping[str, Any]) -> tuple[str, ...]:
  axes = rules.get(name) if name is not None else None
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def mesh_spec(logical: P, shape: Sequence[int], dtype, mesh: Mesh, rules: Rules) -> P:
  """The mesh ``PartitionSpec`` of one leaf from its logical one (e.g. ``P("embed", "mlp")``).

  Each logical name becomes the mesh axes ``rules`` give it (``None`` or a missing name:
  not split), keeping only axes of size > 1 that the mesh has, that no earlier dimension
  took, and whose product divides the dimension (else that dimension stays whole, never
  padded). Then ZeRO-3: a floating-point leaf that ``fsdp`` does not split yet is split over
  it on its largest dimension that ``fsdp`` divides (and no other axis splits), so leaves
  without logical names (a user's model, BatchNorm statistics) are sharded too. Integer
  leaves (step, rng, counters) stay replicated unless their names say otherwise.
  """
  rules, used, dims = dict(rules), set(), []
  names = tuple(logical) + (None,) * (len(shape) - len(logical))
  for size, name in zip(shape, names):
    axes = tuple(a for a in _rule_axes(name, rules)
                 if mesh.shape.get(a, 1) > 1 and a not in used)
    if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
      used.update(axes)
      dims.append(axes)
    else:
      dims.append(())
  fsdp = mesh.shape.get(FSDP, 1)
  if fsdp > 1 and FSDP not in used and np.issubdtype(np.dtype(dtype), np.floating):
    free = [i for i, size in enumerate(shape) if not dims[i] and size % fsdp == 0]
    if free:
      dims[max(free, key=lambda i: shape[i])] = (FSDP,)
  while dims and not dims[-1]:
    dims.pop()
  return P(*(None if not d else d[0] if len(d) == 1 else d for d in dims))


def logical_shardings(abstract: PyTree, mesh: Mesh, rules: Rules) -> PyTree:
  """``NamedSharding`` of every leaf of ``abstract``, a tree as ``jax.eval_shape`` returns it
  from a function that keeps Flax's ``nn.LogicallyPartitioned`` boxes (logical axis names);
  the result has the tree's unboxed structure (see ``mesh_spec``)."""
  import flax.linen as nn  # Only here: this module stays free of Flax otherwise.

  specs = nn.get_partition_spec(abstract)
  return jax.tree.map(lambda leaf, spec: NamedSharding(
      mesh, mesh_spec(spec, leaf.shape, leaf.dtype, mesh, rules)),
      nn.meta.unbox(abstract), specs)


def put_like(tree: PyTree, shardings: PyTree) -> PyTree:
  """``tree`` (host or jax arrays) laid out by ``shardings`` (a tree of the same structure).

  Global arrays that are not all on this process are resharded by ``jax.device_put``;
  others are placed from this process's copy, each process its own devices' parts.
  """
  def put(x, s):
    if isinstance(x, jax.Array) and (jax.process_count() == 1 or not x.is_fully_addressable):
      return jax.device_put(x, s)
    return put_global(x, s)

  return jax.tree.map(put, tree, shardings)


def shardings_of(tree: PyTree) -> PyTree:
  """The ``sharding`` of every leaf of a tree of jax arrays."""
  return jax.tree.map(lambda x: x.sharding, tree)


def mesh_of(tree: PyTree) -> Mesh | None:
  """The mesh of the first leaf of ``tree`` laid out by a ``NamedSharding`` (None if none is)."""
  for leaf in jax.tree.leaves(tree):
    if isinstance(getattr(leaf, "sharding", None), NamedSharding):
      return leaf.sharding.mesh
  return None


def bytes_per_device(tree: PyTree) -> dict[jax.Device, int]:
  """Bytes of ``tree``'s jax arrays held by each device of this process, summed over the
  arrays' own ``addressable_shards`` (a replicated array counts whole on every device)."""
  held: dict[jax.Device, int] = {}
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array):
      for shard in leaf.addressable_shards:
        held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
  return held


def shard_bytes(leaf) -> int:
  """Bytes of ``leaf`` on the device that holds the most of it: from its
  ``addressable_shards`` for an array, from its sharding's shard shape for a
  ``jax.ShapeDtypeStruct`` (the whole leaf without a sharding)."""
  if isinstance(leaf, jax.Array):
    return max(shard.data.nbytes for shard in leaf.addressable_shards)
  shape, sharding = tuple(leaf.shape), getattr(leaf, "sharding", None)
  if sharding is not None:
    shape = sharding.shard_shape(shape)
  return math.prod(shape) * np.dtype(leaf.dtype).itemsize


def partition_spec(leaf) -> P | None:
  """The ``PartitionSpec`` of a leaf laid out by a ``NamedSharding``, else None."""
  sharding = getattr(leaf, "sharding", None)
  return sharding.spec if isinstance(sharding, NamedSharding) else None


def describe_mesh(mesh: Mesh | Mapping[str, int]) -> str:
  """``"data=2 x fsdp=4 x model=1"``."""
  shape = mesh.shape if isinstance(mesh, Mesh) else mesh
  return " x ".join(f"{name}={size}" for name, size in shape.items())


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


EXIT_PEER_LOST = 3  # A process of a multi-process run stopped answering.


class PeerLostError(RuntimeError):
  """A process of a multi-process run stopped answering (died, or its host went away)."""


_ALIVE = "fjt/alive/"  # Key-value prefix: each process's Watchdog counts up under it.


def _alive_counts(client) -> dict[int, str]:
  return {int(key.rsplit("/", 1)[1]): value for key, value in client.key_value_dir_get(_ALIVE)}


def silent_processes(wait_s: float = 2.0) -> list[int] | None:
  """The processes whose Watchdog stopped counting in the coordination service's key-value
  store over ``wait_s`` seconds (a dead process counts no more); ``[0]`` if the service itself
  (process 0) no longer answers; None in a single-process run."""
  from jax._src import distributed
  client = distributed.global_state.client
  if client is None:
    return None
  try:
    before = _alive_counts(client)
    time.sleep(wait_s)
    after = _alive_counts(client)
  except Exception:  # The coordination service runs in process 0.
    return [0] if jax.process_index() != 0 else None
  me = jax.process_index()
  return [i for i in range(jax.process_count())
          if i != me and (i not in after or after[i] == before.get(i))]


def describe_lost_peers(wait_s: float = 2.0) -> str:
  lost = silent_processes(wait_s)
  if lost:
    return f"process {', '.join(map(str, lost))} stopped answering"
  return "a peer process stopped answering"


def peer_lost(error: BaseException, step: int) -> PeerLostError:
  """``error`` (a collective that failed in a multi-process run) as one line naming the lost
  process and the step."""
  cause = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
  return PeerLostError(f"process {jax.process_index()} of {jax.process_count()}: "
                       f"{describe_lost_peers()} during step {step} ({cause})")


class Watchdog:
  """Ends the process with a clear error when ``beat()`` is not called for ``timeout_s``.

  A multi-process run whose peer died blocks inside a collective; this thread is
  the bound on how long, whatever the transport does.
  """

  def __init__(self, timeout_s: float, what: str = "a training step"):
    from jax._src import distributed
    self.timeout_s, self.what = timeout_s, what
    self._client = distributed.global_state.client
    self._last, self.step = time.monotonic(), None
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._watch, name="fjt-watchdog", daemon=True)
    self._thread.start()

  def beat(self, step: int | None = None) -> None:
    """Progress was made; ``step`` (the last one done) is named if the run is found stuck."""
    self._last, self.step = time.monotonic(), step

  def _watch(self) -> None:
    interval, count = min(1.0, self.timeout_s / 4), 0
    while not self._stop.wait(interval):
      count += 1
      if self._client is not None:  # Tells the others this process is alive.
        try:
          self._client.key_value_set(f"{_ALIVE}{jax.process_index()}", str(count),
                                     allow_overwrite=True)
        except Exception:
          pass  # The coordinator is gone; the timeout below says so.
      if time.monotonic() - self._last > self.timeout_s:
        after = "" if self.step is None else f" after step {self.step}"
        sys.stderr.write(
            f"error: process {jax.process_index()} of {jax.process_count()}: "
            f"{describe_lost_peers(3 * interval)}; {self.what} made no progress for "
            f"{self.timeout_s:.0f} s{after} (config key 'distributed.timeout_s'). Exiting.\n")
        sys.stderr.flush()
        os._exit(EXIT_PEER_LOST)

  def stop(self) -> None:
    self._stop.set()
