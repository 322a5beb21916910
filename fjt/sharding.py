"""Device meshes and shardings of the train state.

Parallelism is ``jax.jit`` over ``NamedSharding``s of one ``Mesh`` with axes ``data``,
``fsdp`` and ``model``: the global batch is split over ``("data", "fsdp")``; the train state
is replicated over ``data``, split over ``fsdp`` (params, gradients and optimizer state:
ZeRO-3) and over ``model`` (Megatron column/row splits), as the logical axis names on the
parameters (``nn.with_logical_partitioning``) and the rules (logical name -> mesh axis) say.
XLA inserts the collectives (so BatchNorm statistics are those of the global batch). Several
machines use JAX's own runtime, ``jax.distributed`` (start-up and lost peers: ``fjt.distributed``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

from fjt.config import ConfigError

PyTree = Any
Rules = Sequence[tuple[str, str | Sequence[str] | None]]

MESH_AXES = ("data", "fsdp", "model")  # Outermost first: ``model`` on the closest devices.
BATCH_AXES = ("data", "fsdp")  # The mesh axes a batch's rows are split over.
FSDP = "fsdp"


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
