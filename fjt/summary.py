"""The state table: fjt's ``print(model.state_dict())``, diffs between states, the
activations of a forward pass and the word vectors of a run (``fjt.embeddings``, re-exported).

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
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from fjt import checkpoint, sharding
from fjt.config import ConfigError
from fjt.embeddings import WordVector, embedding, embedding_table, nearest, vocab_words  # Re-exported.
from fjt.tree import flatten, path_str, to_nested_dict

PyTree = Any
COLLECTIONS = ("params", "batch_stats", "opt_state", "step", "rng")


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


def _is_config_path(source) -> bool:
  return isinstance(source, (str, os.PathLike)) and os.fspath(source).endswith(".py")


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


def _run_config_json(path: str) -> dict[str, Any] | None:
  """The ``config.json`` of the run that wrote the checkpoint at ``path``, or None."""
  path = os.path.abspath(path)
  for _ in range(4):  # workdir/checkpoints/<step>/default at most.
    config_file = os.path.join(path, "config.json")
    if os.path.isfile(config_file):
      with open(config_file, encoding="utf-8") as f:
        return json.load(f)
    path = os.path.dirname(path)
  return None


def _run_freeze(path: str) -> tuple[str, ...]:
  """The ``freeze`` patterns of the run that wrote the checkpoint at ``path``, if known."""
  return tuple((_run_config_json(path) or {}).get("freeze", ()))


def leaves(source, stats: bool = False, mesh: Mapping[str, int] | None = None
           ) -> tuple[dict[str, Any], tuple[str, ...]]:
  """``({path: leaf}, freeze patterns)`` of a source; leaves are arrays, or
  ``jax.ShapeDtypeStruct`` when only shapes are known. ``mesh`` (``{axis: size}``, config
  sources only) lays a config's state out on that mesh."""
  if mesh is not None and not _is_config_path(source):
    raise ConfigError("a mesh applies to a config file's state; a live state or checkpoint "
                      "has its own layout")
  if _is_config_path(source):
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


def _stats(leaf) -> dict[str, float]:
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
    leaf_stats = _stats(leaf) if stats and not isinstance(leaf, jax.ShapeDtypeStruct) else None
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


def _grid(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
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
  text = _grid(header, body) + "\n\n" + _grid(["collection", "leaves", "elements", "bytes", ""],
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


# --- A run's model, config and data ---------------------------------------------------------------


def _tuples(value):
  """JSON lists back to the tuples a config file writes (``features=(256, 256)``)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def run_config(source: str | os.PathLike) -> ml_collections.ConfigDict:
  """The config of a config file, or of the run that wrote the checkpoint at ``source`` (a run
  workdir, its ``checkpoints/`` or a step directory: the ``config.json`` in or above it)."""
  from fjt.config import ConfigError, load_config, with_run_defaults

  if _is_config_path(source):
    return load_config(source)
  saved = _run_config_json(os.fspath(source))
  if saved is None:
    raise ConfigError(f"{os.fspath(source)!r} has no config.json in it or in the 3 directories "
                      "above it: give a run workdir (or a checkpoint inside one) or a config file")
  return with_run_defaults(ml_collections.ConfigDict(_tuples(saved)))


def load_model(source: str | os.PathLike) -> tuple[nn.Module, dict[str, PyTree], ml_collections.ConfigDict]:
  """``(model, variables, config)`` of a run or checkpoint (its newest step's ``params`` and
  ``batch_stats``) or of a config file (its fresh variables, initialised as the run would)."""
  from fjt.data import load_dataset
  from fjt.models import create_model
  from fjt.state import create_from_config

  config = run_config(source)
  if _is_config_path(source):
    example = jax.tree.map(lambda v: v[:1], load_dataset(config.data).train["x"])
    model, _, state = create_from_config(config, example)
    return model, state.variables, config
  return create_model(config.model), checkpoint.load_variables(source), config


def validation_batch(config: ml_collections.ConfigDict, size: int) -> PyTree:
  """The first ``size`` inputs (an array, or a dict of arrays) of the validation split of
  ``config.data``."""
  from fjt.data import load_dataset

  if size < 1:
    raise ValueError(f"batch size must be positive, got {size}")
  return jax.tree.map(lambda v: v[:size], load_dataset(config.data).test["x"])


# --- Activations ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ActivationRow:
  """One module output, or one value a model sowed into ``"intermediates"``, of a forward pass.

  ``path`` is the module's path (``Dense_0``, ``h_0/mlp/c_fc``) or the sown name under it
  (``relu_0``: fjt's models sow each ReLU output); ``(output)`` is the model's own output; a
  suffix ``[i]`` is the i-th call of a module called more than once. ``stats``: ``mean``,
  ``std``, ``min``, ``max`` of the finite values; ``zeros``, the fraction of elements exactly 0
  (after a ReLU: the inactive ones); ``dead``, the fraction of features (the last axis) that are
  0 for every example and position (dead ReLU units; NaN below 2 dims); ``nonfinite``, the count
  of NaN and Inf.
  """
  path: str
  shape: tuple[int, ...]
  dtype: str
  stats: dict[str, float]


def _walk_intermediates(node: Mapping, prefix: tuple[str, ...], out: dict[str, jax.Array]) -> None:
  for name, value in node.items():  # Insertion order: the order the values were computed.
    if isinstance(value, Mapping):
      _walk_intermediates(value, prefix + (name,), out)
      continue
    label = "/".join(prefix if name == "__call__" else prefix + (name,)) or "(output)"
    calls = value if isinstance(value, tuple) else (value,)
    for i, call in enumerate(calls):
      for keypath, leaf in jax.tree_util.tree_flatten_with_path(call)[0]:
        suffix = (f"[{i}]" if len(calls) > 1 else "") + (f"/{path_str(keypath)}" if keypath else "")
        out[label + suffix] = leaf


def capture(model: nn.Module, variables: Mapping[str, PyTree], batch) -> dict[str, np.ndarray]:
  """``{path: array}`` of every module output and sown ``"intermediates"`` value of one
  forward pass in eval mode, in the order they were computed (paths as ``ActivationRow``'s).

  ``batch`` is the model's input (an array or a dict of arrays), or a batch holding it under
  ``"x"``. The model is called with ``train=False`` if its ``__call__`` takes ``train``; no
  variable is updated.
  """
  from fjt.state import model_kwargs

  x = batch["x"] if isinstance(batch, Mapping) and "x" in batch else batch
  kwargs = model_kwargs(model, train=False)

  paths: list[str] = []  # Filled while tracing: jit would return the dicts in sorted key order.

  @jax.jit
  def forward(variables, x):
    _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"],
                           **kwargs)
    found: dict[str, jax.Array] = {}
    _walk_intermediates(state["intermediates"], (), found)
    paths.extend(found)
    return list(found.values())

  arrays = forward(dict(variables), x)
  return {p: np.asarray(a) for p, a in zip(paths, arrays)}


def activation_stats(x: np.ndarray) -> dict[str, float]:
  """``mean, std, min, max`` (finite values), ``zeros``, ``dead``, ``nonfinite`` of ``x``
  (see ``ActivationRow``)."""
  x = np.asarray(x)
  stats = _stats(x)
  nonfinite = stats.pop("nonfinite")
  stats["zeros"] = float(np.count_nonzero(x == 0) / x.size) if x.size else float("nan")
  stats["dead"] = (float(np.all(x == 0, axis=tuple(range(x.ndim - 1))).mean())
                   if x.ndim >= 2 and x.size else float("nan"))
  stats["nonfinite"] = nonfinite
  return stats


def activation_rows(captured: Mapping[str, np.ndarray]) -> list[ActivationRow]:
  return [ActivationRow(p, tuple(a.shape), a.dtype.name, activation_stats(a))
          for p, a in captured.items()]


def activations(model: nn.Module, variables: Mapping[str, PyTree], batch) -> list[ActivationRow]:
  """The activation table of one eval-mode forward pass of ``batch`` (see ``capture``)."""
  return activation_rows(capture(model, variables, batch))


def format_activations(rows: Sequence[ActivationRow]) -> str:
  keys = ("mean", "std", "min", "max", "zeros", "dead")
  body = [[r.path, str(r.shape), r.dtype, *(f"{r.stats[k]:.4g}" for k in keys),
           str(r.stats["nonfinite"])] for r in rows]
  return _grid(["path", "shape", "dtype", *keys, "nonfinite"], body)


def plot_activations(captured: Mapping[str, np.ndarray], png_path: str, bins: int = 50) -> None:
  """One histogram of the finite values per captured array (log counts), 4 to a row."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  cols = min(4, max(len(captured), 1))
  rows = max(-(-len(captured) // cols), 1)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
  for ax in axes.flat[len(captured):]:
    ax.axis("off")
  for ax, (path, array) in zip(axes.flat, captured.items()):
    values = np.asarray(array, np.float64).ravel()
    ax.hist(values[np.isfinite(values)], bins=bins, log=True)
    ax.set_title(f"{path} {tuple(array.shape)}", fontsize=9)
  fig.tight_layout()
  fig.savefig(png_path, dpi=100)
  plt.close(fig)


# --- A run's vocabulary (word vectors: fjt.embeddings) --------------------------------------------


def dataset_vocabulary(info: Mapping[str, Any]) -> list[str] | None:
  """The words, in id order, of a dataset's ``info``: ``info["vocab"]``, or the list of a word
  tokenizer ``info["tokenizer"] = {"type": "word", "vocab": [...]}`` (a dict or its JSON);
  None for data without a word vocabulary (a BPE tokenizer, images)."""
  if info.get("vocab") is not None:
    return list(info["vocab"])
  tokenizer = info.get("tokenizer")
  if isinstance(tokenizer, str):
    try:
      tokenizer = json.loads(tokenizer)
    except json.JSONDecodeError:
      return None
  if isinstance(tokenizer, Mapping) and tokenizer.get("type") == "word":
    return list(tokenizer["vocab"])
  return None


def run_vocabulary(source: str | os.PathLike) -> list[str]:
  """The vocabulary (words in id order) of a run or config: its dataset rebuilt from
  ``config.data`` (deterministic), whose info must carry one (``dataset_vocabulary``)."""
  from fjt.config import ConfigError
  from fjt.data import load_dataset

  config = run_config(source)
  vocab = dataset_vocabulary(load_dataset(config.data).info)
  if vocab is None:
    raise ConfigError(f"{os.fspath(source)}: dataset {config.data.get('name')!r} carries no word "
                      "vocabulary (info['vocab'] or a word tokenizer), so words cannot be mapped "
                      "to ids")
  return vocab
