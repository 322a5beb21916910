"""The state table: fjt's ``print(model.state_dict())``, and diffs between states.

A source is a live pytree (a ``TrainState``, variables or params), a checkpoint
on disk (read from Orbax metadata; arrays are read only for ``stats``) or a
config file (its freshly initialised state via ``jax.eval_shape``, nothing
allocated). The activations of a forward pass are ``fjt.activations``'s.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from fjt import checkpoint, runs, sharding
from fjt.config import ConfigError
from fjt.tree import flatten, to_nested_dict

PyTree = Any
COLLECTIONS = ("params", "base", "batch_stats", "opt_state", "step", "rng")  # base: LoRA's frozen params.


@dataclasses.dataclass(frozen=True)
class Row:
  """One leaf of a state.

  ``key`` is the PyTorch-style dotted name (the collection dropped for params
  and batch_stats: ``Dense_0.kernel``). ``status`` is "trainable" or "frozen"
  for params, "" otherwise. ``stats`` holds mean, std, min, max and nonfinite
  (the count of NaN and Inf) when asked for. For a leaf laid out on a mesh (a live sharded
  array, or a config's state on a mesh), ``sharding`` is its ``PartitionSpec`` and
  ``device_bytes`` what one device holds of it (from the array's own ``addressable_shards``).
  """
  path: str
  key: str
  collection: str
  shape: tuple[int, ...]
  dtype: str
  bytes: int
  status: str
  stats: dict[str, float] | None = None
  sharding: str = ""  # The PartitionSpec of a leaf laid out on a mesh, e.g. "P('fsdp', 'model')".
  device_bytes: int | None = None  # Bytes on the device holding the most of it (None: bytes).


def _config_state(path: str, mesh: Mapping[str, int] | None = None):
  from fjt.config import load_config
  from fjt.sharding import abstract_mesh
  from fjt.state import abstract_from_config

  config = load_config(path)
  if mesh is not None:
    sizes = [size for size in mesh.values() if size != -1]
    if len(sizes) != len(mesh):
      raise ConfigError(f"mesh {dict(mesh)}: give every axis's size (no -1) for a config's table")
    mesh = abstract_mesh(mesh, int(np.prod(sizes)))
  return abstract_from_config(config, mesh)[1], tuple(config.get("freeze", ()))


def _run_freeze(path: str) -> tuple[str, ...]:
  """The ``freeze`` patterns of the run that wrote the checkpoint at ``path``, if known."""
  return tuple((runs.find_record(path) or {}).get("freeze", ()))


def leaves(source, stats: bool = False, mesh: Mapping[str, int] | None = None
           ) -> tuple[dict[str, Any], tuple[str, ...]]:
  """``({path: leaf}, freeze patterns)`` of a source; leaves are arrays, or
  ``jax.ShapeDtypeStruct`` when only shapes are known. ``mesh`` (``{axis: size}``, config
  sources only) lays a config's state out on that mesh."""
  if mesh is not None and not runs.is_config_path(source):
    raise ConfigError("a mesh applies to a config file's state; a live state or checkpoint "
                      "has its own layout")
  if runs.is_config_path(source):
    abstract, freeze = _config_state(os.fspath(source), mesh)
    return flatten(to_nested_dict(abstract)), freeze
  if isinstance(source, (str, os.PathLike)):
    flat = flatten(checkpoint.load(source)) if stats else checkpoint.saved_shapes(source)
    return flat, _run_freeze(os.fspath(source))
  return flatten(to_nested_dict(source)), ()


def _collection(path: str, bare_params: bool) -> str:
  head = path.split("/", 1)[0]
  if head in COLLECTIONS:
    return head
  return "params" if bare_params else "other"


def finite_stats(leaf) -> dict[str, float]:
  """``mean``, ``std``, ``min``, ``max`` of the finite values of ``leaf`` (in float64; NaN if
  there are none) and ``nonfinite``, the count of NaN and Inf."""
  x = np.asarray(leaf, dtype=np.float64)
  finite = x[np.isfinite(x)]
  nonfinite = int(x.size - finite.size)
  if not finite.size:
    return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"),
            "nonfinite": nonfinite}
  return {"mean": float(finite.mean()), "std": float(finite.std()), "min": float(finite.min()),
          "max": float(finite.max()), "nonfinite": nonfinite}


def state_table(source, stats: bool = False, freeze: Sequence[str] = (),
                mesh: Mapping[str, int] | None = None) -> list[Row]:
  """One ``Row`` per leaf of ``source``; ``freeze`` adds path patterns of frozen
  params to those of a config source; ``mesh`` (``{axis: size}``, e.g. ``{"data": 2,
  "fsdp": 4}``) lays a config's state out on that mesh (``config.sharding_rules``)."""
  flat, config_freeze = leaves(source, stats, mesh)
  freeze = tuple(freeze) + config_freeze
  bare_params = not any(p.split("/", 1)[0] in COLLECTIONS for p in flat)
  rows = []
  for path, leaf in flat.items():
    collection = _collection(path, bare_params)
    full = path if not bare_params else f"params/{path}"
    key = full.split("/", 1)[1] if collection in ("params", "batch_stats") else full
    shape, dtype = checkpoint.shape_dtype(leaf)
    status = ""
    if collection == "params":
      status = "frozen" if any(re.search(f, full) for f in freeze) else "trainable"
    has_values = stats and not isinstance(leaf, jax.ShapeDtypeStruct)
    leaf_stats = finite_stats(leaf) if has_values else None
    spec = sharding.partition_spec(leaf)
    rows.append(Row(full if bare_params else path, key.replace("/", "."), collection, shape,
                    dtype.name, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, status,
                    leaf_stats, "" if spec is None else str(spec),
                    None if spec is None else sharding.shard_bytes(leaf)))
  return rows


def bytes_per_device(rows: Sequence[Row]) -> int:
  """Bytes of the state on the device holding the most: the sum of each row's
  ``device_bytes`` (its ``bytes`` where unsharded). fjt's layouts split each leaf evenly, so
  every device of a mesh holds the same."""
  return sum(r.bytes if r.device_bytes is None else r.device_bytes for r in rows)


def totals(rows: Sequence[Row]) -> dict[str, dict[str, int]]:
  """Per collection, and ``"total"``: ``{"leaves", "elements", "bytes"}``;
  trainable and frozen elements for params."""
  out: dict[str, dict[str, int]] = collections.defaultdict(lambda: collections.Counter())
  for row in rows:
    elements = int(np.prod(row.shape, dtype=np.int64))
    for name in (row.collection, "total"):
      out[name]["leaves"] += 1
      out[name]["elements"] += elements
      out[name]["bytes"] += row.bytes
    if row.status:
      out[row.collection][row.status] += elements
  order = [c for c in (*COLLECTIONS, "other") if c in out] + ["total"]
  return {k: dict(out[k]) for k in order if k in out}


def human_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} GiB"


def grid(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
  """``header`` and the rows of ``body`` as left-aligned text columns, a rule under the header."""
  widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
  line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
  return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


def format_table(rows: Sequence[Row]) -> str:
  """The table as aligned text, then the totals."""
  stats, sharded = any(r.stats for r in rows), any(r.sharding for r in rows)
  header = ["path", "key", "collection", "shape", "dtype", "bytes", "status"]
  if sharded:
    header += ["sharding", "per device"]
  if stats:
    header += ["mean", "std", "min", "max", "nonfinite"]
  body = []
  for r in rows:
    line = [r.path, r.key, r.collection, str(r.shape), r.dtype, human_bytes(r.bytes), r.status]
    if sharded:
      line += [r.sharding, human_bytes(r.bytes if r.device_bytes is None else r.device_bytes)]
    if stats:
      s = r.stats or {}
      line += [f"{s[k]:.4g}" if k in s else "" for k in ("mean", "std", "min", "max")]
      line.append(str(s.get("nonfinite", "")))
    body.append(line)
  total_body = []
  for name, t in totals(rows).items():
    extra = (f"{t.get('trainable', 0):,} trainable, {t.get('frozen', 0):,} frozen"
             if name == "params" else "")
    total_body.append([name, str(t["leaves"]), f"{t['elements']:,}", human_bytes(t["bytes"]), extra])
  text = grid(header, body) + "\n\n" + grid(["collection", "leaves", "elements", "bytes", ""],
                                             total_body)
  if sharded:
    total = totals(rows)["total"]["bytes"]
    text += (f"\n\nper device: {human_bytes(bytes_per_device(rows))} of {human_bytes(total)} "
             f"({bytes_per_device(rows) / max(total, 1):.3f} of the state)")
  return text


def diff(a, b) -> checkpoint.LoadReport:
  """What loading ``a`` onto ``b`` would report: missing (in b only), unexpected
  (in a only), mismatched shape or dtype. Sources as for ``state_table``."""
  def shapes(source) -> dict[str, jax.ShapeDtypeStruct]:
    return {p: jax.ShapeDtypeStruct(*checkpoint.shape_dtype(v)) for p, v in leaves(source)[0].items()}

  return checkpoint.compare(shapes(a), shapes(b))
