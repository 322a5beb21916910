"""The state table: fjt's ``print(model.state_dict())``, and diffs between states.

A source is a live pytree (a ``TrainState``, variables or params), a checkpoint
on disk (read from Orbax metadata; arrays are read only for ``stats``) or a
config file (its freshly initialised state via ``jax.eval_shape``, nothing
allocated).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from fjt import checkpoint
from fjt.tree import flatten, to_nested_dict

PyTree = Any
COLLECTIONS = ("params", "batch_stats", "opt_state", "step", "rng")


@dataclasses.dataclass(frozen=True)
class Row:
  """One leaf of a state.

  ``key`` is the PyTorch-style dotted name (the collection dropped for params
  and batch_stats: ``Dense_0.kernel``). ``status`` is "trainable" or "frozen"
  for params, "" otherwise. ``stats`` holds mean, std, min, max and nonfinite
  (the count of NaN and Inf) when asked for.
  """
  path: str
  key: str
  collection: str
  shape: tuple[int, ...]
  dtype: str
  bytes: int
  status: str
  stats: dict[str, float] | None = None


def _is_config_path(source) -> bool:
  return isinstance(source, (str, os.PathLike)) and os.fspath(source).endswith(".py")


def _config_state(path: str):
  from fjt.config import load_config
  from fjt.state import abstract_from_config

  config = load_config(path)
  return abstract_from_config(config)[1], tuple(config.get("freeze", ()))


def _run_freeze(path: str) -> tuple[str, ...]:
  """The ``freeze`` patterns of the run that wrote the checkpoint at ``path``, if known."""
  path = os.path.abspath(path)
  for _ in range(4):  # workdir/checkpoints/<step>/default at most.
    config_file = os.path.join(path, "config.json")
    if os.path.isfile(config_file):
      with open(config_file, encoding="utf-8") as f:
        return tuple(json.load(f).get("freeze", ()))
    path = os.path.dirname(path)
  return ()


def leaves(source, stats: bool = False) -> tuple[dict[str, Any], tuple[str, ...]]:
  """``({path: leaf}, freeze patterns)`` of a source; leaves are arrays, or
  ``jax.ShapeDtypeStruct`` when only shapes are known."""
  if _is_config_path(source):
    abstract, freeze = _config_state(os.fspath(source))
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


def _stats(leaf) -> dict[str, float]:
  x = np.asarray(leaf, dtype=np.float64)
  finite = x[np.isfinite(x)]
  nonfinite = int(x.size - finite.size)
  if not finite.size:
    return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"),
            "nonfinite": nonfinite}
  return {"mean": float(finite.mean()), "std": float(finite.std()), "min": float(finite.min()),
          "max": float(finite.max()), "nonfinite": nonfinite}


def state_table(source, stats: bool = False, freeze: Sequence[str] = ()) -> list[Row]:
  """One ``Row`` per leaf of ``source``; ``freeze`` adds path patterns of frozen
  params to those of a config source."""
  flat, config_freeze = leaves(source, stats)
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
    leaf_stats = _stats(leaf) if stats and not isinstance(leaf, jax.ShapeDtypeStruct) else None
    rows.append(Row(full if bare_params else path, key.replace("/", "."), collection, shape,
                    dtype.name, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, status,
                    leaf_stats))
  return rows


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


def _grid(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
  widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
  line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
  return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


def format_table(rows: Sequence[Row]) -> str:
  """The table as aligned text, then the totals."""
  stats = any(r.stats for r in rows)
  header = ["path", "key", "collection", "shape", "dtype", "bytes", "status"]
  if stats:
    header += ["mean", "std", "min", "max", "nonfinite"]
  body = []
  for r in rows:
    line = [r.path, r.key, r.collection, str(r.shape), r.dtype, human_bytes(r.bytes), r.status]
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
  return (_grid(header, body) + "\n\n" +
          _grid(["collection", "leaves", "elements", "bytes", ""], total_body))


def diff(a, b) -> checkpoint.LoadReport:
  """What loading ``a`` onto ``b`` would report: missing (in b only), unexpected
  (in a only), mismatched shape or dtype. Sources as for ``state_table``."""
  def shapes(source) -> dict[str, jax.ShapeDtypeStruct]:
    return {p: jax.ShapeDtypeStruct(*checkpoint.shape_dtype(v)) for p, v in leaves(source)[0].items()}

  return checkpoint.compare(shapes(a), shapes(b))
