"""PyTorch ``state_dict`` <-> fjt variables, and ``.safetensors`` / ``.pt`` weight files.

``from_state_dict`` fills a Flax variables tree ``{"params": ..., "batch_stats": ...}`` from a
PyTorch ``state_dict`` (name -> tensor or array); ``to_state_dict`` is its exact inverse.
Layouts (PyTorch -> Flax; the reverse on export):

  Linear.weight (out, in)                 -> Dense.kernel (in, out)
  ConvNd.weight (out, in, *spatial)       -> Conv.kernel (*spatial, in, out)   e.g. OIHW -> HWIO
  BatchNorm.weight, .bias                 -> params/BatchNorm_i/scale, bias
  BatchNorm.running_mean, .running_var    -> batch_stats/BatchNorm_i/mean, var
  BatchNorm.num_batches_tracked           -> not used (Flax keeps no count)
  Embedding.weight (num, dim)             -> Embed.embedding (num, dim), unchanged

PyTorch flattens conv features as (C, H, W) and fjt's CNN as (H, W, C), so the Dense after
the conv stack needs its input rows permuted: ``nchw_flatten={"params/Dense_0": (C, H, W)}``,
which ``cnn_nchw_flatten(model, input_shape)`` computes for an fjt ``CNN``.

Flax paths are '/'-joined (``params/Dense_0/kernel``), torch keys dotted (``fc1.weight``).
PyTorch is imported only by the functions that make or read torch tensors.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from fjt.models.cnn import CNN
from fjt.tree import flatten, path_str

PyTree = Any
KeyMap = Sequence[tuple[str, "str | None"]]
NchwFlatten = Mapping[str, Sequence[int]]

FILE_TYPES = (".safetensors", ".pt", ".pth")

# For each kind of module: torch leaf name -> (collection, Flax leaf name).
_LEAVES: dict[str, dict[str, tuple[str, str]]] = {
    "dense": {"weight": ("params", "kernel"), "bias": ("params", "bias")},
    "conv": {"weight": ("params", "kernel"), "bias": ("params", "bias")},
    "batchnorm": {"weight": ("params", "scale"), "bias": ("params", "bias"),
                  "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")},
    "embed": {"weight": ("params", "embedding")},
}
_TORCH_LEAF = {flax: name for table in _LEAVES.values() for name, flax in table.items()}
_TORCH_LEAF_ORDER = ("weight", "bias", "running_mean", "running_var")  # As torch lists them.

# Torch dtypes numpy lacks: (torch dtype name, ml_dtypes type, integer type of the same width).
_BIT_CAST = (("bfloat16", ml_dtypes.bfloat16, np.int16),
             ("float8_e4m3fn", ml_dtypes.float8_e4m3fn, np.uint8),
             ("float8_e5m2", ml_dtypes.float8_e5m2, np.uint8))


@dataclasses.dataclass(frozen=True)
class ImportReport:
  """What ``from_state_dict`` did, by torch key and '/'-joined Flax path.

  Attributes:
    matched: torch key -> Flax path of every value used, in state_dict order.
    reshaped: the entries of ``matched`` whose layout changed (transposed kernels,
      NCHW-flatten row permutations).
    unmatched: Flax paths that got no value; they keep the target's leaf.
    unused: torch keys whose value was not used, BatchNorm's ``num_batches_tracked`` among them.
  """
  matched: Mapping[str, str]
  reshaped: Mapping[str, str]
  unmatched: tuple[str, ...]
  unused: tuple[str, ...]


def from_state_dict(state_dict: Mapping[str, Any], variables: PyTree,
                    key_map: KeyMap | None = None,
                    nchw_flatten: NchwFlatten | None = None) -> tuple[PyTree, ImportReport]:
  """Fills Flax ``variables`` from a PyTorch ``state_dict``.

  Args:
    state_dict: torch key -> ``torch.Tensor`` or array, e.g. ``module.state_dict()`` or
      ``load_file(path)``. Its order matters for automatic matching (below).
    variables: the target, e.g. ``fjt.init_variables(model, x, rng)``, ``{"params",
      "batch_stats"}`` of arrays or ``jax.ShapeDtypeStruct``. It fixes every shape and dtype.
    key_map: ``(pattern, template)`` rules, tried in order on every torch key; the first whose
      pattern ``re.fullmatch``-es the key sends its value to the Flax path
      ``match.expand(template)``, e.g. ``(r"head\\.weight", "params/Dense_2/kernel")`` or
      ``(r"features\\.(\\d+)\\.bias", r"params/Conv_\\1/bias")``; a template of ``None`` drops
      the key (reported unused). Layouts convert as in automatic matching, by the Flax leaf
      name (``kernel`` is transposed). A torch module with any key taken by a rule, and a Flax
      module with any leaf filled by one, are left out of automatic matching, so map every
      tensor of a renamed module.
    nchw_flatten: Flax Dense module path -> ``(C, H, W)``, for a Dense whose torch counterpart
      took input flattened from NCHW features; see ``cnn_nchw_flatten``.

  Automatic matching pairs whole modules. A torch module is a key's prefix before its last
  '.'; its kind comes from its tensors: ``running_mean`` and ``running_var`` -> BatchNorm;
  a ``weight`` of rank >= 3 -> Conv; a 2-D ``weight`` with ``bias`` -> Dense; a 2-D ``weight``
  alone -> Embed while the target has an Embed module left, else a bias-free Dense. A Flax
  module is a path between collection and leaf (``Dense_0``), its kind from its leaves
  (``embedding``; ``batch_stats`` mean and var; a 2-D or higher ``kernel``). First a torch
  module whose name with '.' read as '/' is a Flax module of its kind is paired with it (so
  ``to_state_dict``'s default names come back). Then, per kind, the remaining torch modules
  in state_dict order (PyTorch's registration order) pair with the remaining Flax modules in
  natural order of their paths (``Dense_2`` before ``Dense_10``), which for Linen's automatic
  names is definition order: the i-th ``nn.Linear`` fills the i-th ``nn.Dense``. Flax's dict
  order is not used: ``jax.tree`` operations sort dict keys.

  Returns:
    ``(variables, report)``: the target's tree with every matched leaf replaced by a jax array
    of the target leaf's shape and dtype (cast from the torch dtype; placed on the target's
    sharding when it has a multi-device one), and an ``ImportReport``.

  Raises:
    ValueError: a value's shape does not fit its Flax path (the message names both, with both
      shapes), a rule names a path the target lacks, two keys fill one path, or
      ``nchw_flatten`` does not fit the target.
  """
  target = flatten(variables)
  rows = _nchw_rows(nchw_flatten, target)
  values = {key: _to_numpy(value) for key, value in state_dict.items()}
  filled: dict[str, np.ndarray] = {}
  matched: dict[str, str] = {}
  reshaped: dict[str, str] = {}

  def fill(key: str, path: str) -> None:
    if path in filled:
      other = next(k for k, p in matched.items() if p == path)
      raise ValueError(f"torch keys {other!r} and {key!r} both map to Flax path {path!r}")
    value, leaf = values[key], target[path]
    expected = _torch_shape(path, tuple(leaf.shape))
    if value.shape != expected:
      raise ValueError(
          f"torch key {key!r} has shape {value.shape}, but Flax path {path!r} has shape "
          f"{tuple(leaf.shape)} and takes a torch tensor of shape {expected}")
    converted = _flax_layout(value, path, rows.get(path))
    filled[path] = np.array(converted, dtype=leaf.dtype, order="C")  # A copy: torch may reuse its memory.
    matched[key] = path
    if converted is not value:
      reshaped[key] = path

  ruled = set()
  rules = _compile(key_map)
  for key in values:
    for pattern, template in rules:
      match = pattern.fullmatch(key)
      if match:
        ruled.add(key)
        if template is not None:
          path = match.expand(template)
          if path not in target:
            raise ValueError(
                f"key_map rule ({pattern.pattern!r}, {template!r}) maps torch key {key!r} to "
                f"Flax path {path!r}, which the target does not have")
          fill(key, path)
        break

  for names, module, kind in _pair_modules(values, ruled, target, set(filled)):
    for name, key in names.items():
      collection, leaf = _LEAVES[kind].get(name, (None, None))
      path = f"{collection}/{module}/{leaf}"
      if leaf is not None and path in target:
        fill(key, path)

  def place(keypath, leaf):
    path = path_str(keypath)
    if path not in filled:
      return leaf
    sharding = getattr(leaf, "sharding", None)
    if sharding is not None and len(sharding.device_set) > 1:
      return jax.device_put(filled[path], sharding)
    return jnp.asarray(filled[path])

  report = ImportReport(
      matched=matched, reshaped=reshaped,
      unmatched=tuple(p for p in target if p not in filled),
      unused=tuple(k for k in values if k not in matched))
  return jax.tree_util.tree_map_with_path(place, variables), report


def to_state_dict(variables: PyTree, key_map: KeyMap | None = None,
                  nchw_flatten: NchwFlatten | None = None) -> dict[str, np.ndarray]:
  """The PyTorch ``state_dict`` of Flax ``variables``: dotted keys, torch layouts and dtypes.

  The inverse of ``from_state_dict``: ``from_state_dict(to_state_dict(v), v)`` gives ``v``
  back bit for bit. Pass the result through ``to_torch`` for ``module.load_state_dict``.

  Default names keep the Flax module path: ``params/Dense_0/kernel`` -> ``Dense_0.weight``,
  ``params/BatchNorm_0/scale`` -> ``BatchNorm_0.weight``, ``batch_stats/BatchNorm_0/mean`` ->
  ``BatchNorm_0.running_mean``, ``params/Embed_0/embedding`` -> ``Embed_0.weight``, nested
  modules dotted (``Block_0.Dense_0.weight``). That is the state_dict of a torch module whose
  attributes carry the Flax names (``self.Dense_0 = nn.Linear(...)``); for other names give
  ``key_map``: ``(pattern, template)`` rules ``re.fullmatch``-ed on the '/'-joined Flax path,
  the first match naming the torch key ``match.expand(template)``, e.g.
  ``(r"params/Dense_2/kernel", "head.weight")``; a template of ``None`` leaves the leaf out.
  Rules must name every tensor of a renamed module.

  Every BatchNorm (a module with ``batch_stats`` mean and var) also gets
  ``<module>.num_batches_tracked = np.int64(0)`` after its ``running_var``, so
  ``load_state_dict(strict=True)`` accepts the result; PyTorch reads that count only for
  ``momentum=None`` (cumulative averages), which fjt does not track.

  Args:
    variables: ``{"params", "batch_stats"}`` (or any tree of arrays).
    key_map: Flax path -> torch key rules, as above.
    nchw_flatten: as in ``from_state_dict``; rows go back to PyTorch's NCHW flatten order.

  Returns:
    torch key -> C-contiguous numpy array, modules in natural order of their Flax paths
    (``Dense_2`` before ``Dense_10``), within a module weight, bias, running_mean,
    running_var, num_batches_tracked. Dtypes are kept (bfloat16 as ``ml_dtypes.bfloat16``).

  Raises:
    ValueError: two Flax paths map to one torch key, or ``nchw_flatten`` does not fit.
  """
  flat = flatten(variables)
  rows = _nchw_rows(nchw_flatten, flat)
  rules = _compile(key_map)
  out: dict[str, np.ndarray] = {}
  sources: dict[str, str] = {}

  def emit(key: str, value: np.ndarray, path: str) -> None:
    if key in out:
      raise ValueError(f"Flax paths {sources[key]!r} and {path!r} both map to torch key {key!r}")
    out[key], sources[key] = value, path

  for module, leaves in sorted(_modules(flat).items(), key=lambda item: _natural_key(item[0])):
    keys = {}
    for (collection, leaf), path in sorted(leaves.items(), key=lambda item: _leaf_rank(item[0])):
      keys[leaf] = key = _rename(path, rules, default=".".join(
          p for p in (module.replace("/", "."), _TORCH_LEAF.get((collection, leaf), leaf)) if p))
      if key is not None:
        value = np.asarray(jax.device_get(flat[path]))
        # order="C", not np.ascontiguousarray, which turns 0-d arrays into 1-d ones.
        emit(key, np.asarray(_torch_layout(value, path, rows.get(path)), order="C"), path)
    if _flax_kind(leaves, flat) == "batchnorm" and keys["mean"] is not None:
      prefix = keys["mean"].rpartition(".")[0]
      emit(f"{prefix}.num_batches_tracked" if prefix else "num_batches_tracked",
           np.array(0, np.int64), leaves[("batch_stats", "mean")])
  return out


def cnn_nchw_flatten(model: CNN, input_shape: Sequence[int]) -> dict[str, tuple[int, int, int]]:
  """The ``nchw_flatten`` argument for an fjt ``CNN`` on NHWC inputs of ``input_shape``.

  fjt's CNN flattens its last conv block's ``(H, W, C)`` features into ``Dense_0`` (the first
  dense layer, or the head when ``dense_features=()``); its PyTorch twin flattens ``(C, H, W)``.
  "SAME" convolutions keep H and W; each 2x2 max pool of stride 2 floors them by half.

  Returns:
    ``{"params/Dense_0": (C, H, W)}``, e.g. ``(16, 2, 2)`` for ``features=(8, 16)`` on
    ``(N, 8, 8, 1)`` inputs.
  """
  if not isinstance(model, CNN):
    raise TypeError(f"cnn_nchw_flatten: expected an fjt CNN, got {type(model).__name__}")
  if len(input_shape) != 4:
    raise ValueError(f"cnn_nchw_flatten: expected an NHWC input shape (N, H, W, C), got {tuple(input_shape)}")
  _, height, width, channels = input_shape
  pools = len(model.features) if model.pool else 0
  channels = model.features[-1] if model.features else channels
  return {"params/Dense_0": (int(channels), int(height) // 2**pools, int(width) // 2**pools)}


def to_torch(arrays: Mapping[str, Any]) -> dict[str, Any]:
  """``{key: torch.Tensor}`` on the CPU with the same bits and dtypes (bfloat16 included).

  For ``module.load_state_dict(to_torch(to_state_dict(variables)))``; needs PyTorch.
  """
  torch = import_torch()
  return {key: _to_tensor(torch, value) for key, value in arrays.items()}


def load_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a weight file into ``{key: numpy array}``.

  ``.safetensors`` (via ``safetensors.numpy``, no PyTorch needed): keys come back in natural
  order (``features.4`` before ``features.10``), since the format keeps no order of its own;
  bfloat16 arrives as ``ml_dtypes.bfloat16``, float8 dtypes are not readable by
  ``safetensors.numpy``. A tree saved by ``save_file`` has '/'-joined keys:
  ``fjt.tree.unflatten(load_file(path))`` rebuilds it.

  ``.pt`` / ``.pth``: ``torch.load(path, weights_only=True, map_location="cpu")`` and nothing
  else: never a full unpickle, which can run arbitrary code. The file must hold a flat
  mapping of name -> tensor, e.g. ``torch.save(module.state_dict(), path)``; its order is kept.

  Raises:
    ValueError: an unknown extension, a ``.pt`` file that needs more than weights-only
      unpickling, or one that is not a mapping of tensors. The message names the file.
    ImportError: a ``.pt`` file without PyTorch installed.
  """
  suffix = _file_type(path)
  if suffix == ".safetensors":
    import safetensors.numpy
    arrays = safetensors.numpy.load_file(path)
    return {key: arrays[key] for key in sorted(arrays, key=_natural_key)}
  torch = import_torch()
  try:
    obj = torch.load(path, weights_only=True, map_location="cpu")
  except pickle.UnpicklingError as e:
    detail = next((line.strip() for line in str(e).splitlines() if "WeightsUnpickler" in line), "")
    raise ValueError(
        f"{os.fspath(path)!r} is not a weights-only PyTorch file, and only weights-only files "
        f"are accepted: its pickle needs objects other than tensors and plain containers, and "
        f"unpickling those can run arbitrary code. Re-save it as torch.save(module.state_dict()) "
        f"or as .safetensors. {detail}".rstrip()) from e
  if not isinstance(obj, Mapping):
    raise ValueError(f"{os.fspath(path)!r}: expected a state_dict (a mapping name -> tensor), "
                     f"found a {type(obj).__name__}")
  for key, value in obj.items():
    if not isinstance(value, torch.Tensor):
      raise ValueError(
          f"{os.fspath(path)!r}: expected a state_dict (a mapping name -> tensor), but key "
          f"{key!r} holds a {type(value).__name__}; top-level keys: {list(obj)[:10]}")
  return {str(key): _to_numpy(value) for key, value in obj.items()}


def save_file(tree: PyTree, path: str | os.PathLike) -> None:
  """Writes a flat ``{key: array}`` or a nested tree of arrays to ``path``, atomically.

  A flat mapping (e.g. ``to_state_dict``'s result) keeps its keys and order; nested mappings
  and other pytrees are flattened to '/'-joined paths (``params/Dense_0/kernel``). Values may
  be numpy, jax or torch arrays; dtypes and bits are kept, bfloat16 included. The file is
  written next to ``path`` under a temporary name and renamed, so it is never half-written.

  ``.safetensors`` needs no PyTorch; ``.pt`` / ``.pth`` is ``torch.save`` of a dict of CPU
  tensors, readable by ``torch.load(path, weights_only=True)``.
  """
  suffix = _file_type(path)
  if isinstance(tree, Mapping) and not any(isinstance(v, Mapping) for v in tree.values()):
    flat = dict(tree)
  else:
    flat = flatten(tree)
  for key in flat:
    if not isinstance(key, str):
      raise ValueError(f"save_file {os.fspath(path)!r}: keys must be strings, got {key!r}")
  arrays = {key: np.asarray(_to_numpy(value), order="C") for key, value in flat.items()}
  if suffix == ".safetensors":
    import safetensors.numpy
    _write_atomically(path, lambda tmp: safetensors.numpy.save_file(arrays, tmp))
  else:
    torch = import_torch()
    tensors = {key: _to_tensor(torch, value) for key, value in arrays.items()}
    _write_atomically(path, lambda tmp: torch.save(tensors, tmp))


def _pair_modules(values: Mapping[str, np.ndarray], ruled: set[str], target: Mapping[str, Any],
                  filled: set[str]) -> list[tuple[dict[str, str], str, str]]:
  """``({torch leaf: torch key}, Flax module path, kind)`` of every automatic pair, in
  state_dict order (the rules are in ``from_state_dict``'s docstring)."""
  torch_modules: dict[str, dict[str, str]] = {}
  for key in values:
    prefix, _, leaf = key.rpartition(".")
    torch_modules.setdefault(prefix, {})[leaf] = key
  ruled_prefixes = {key.rpartition(".")[0] for key in ruled}
  flax_modules = _modules(target)
  free: dict[str, list[str]] = {kind: [] for kind in _LEAVES}
  for module in sorted(flax_modules, key=_natural_key):
    kind = _flax_kind(flax_modules[module], target)
    if module and kind and not filled & set(flax_modules[module].values()):
      free[kind].append(module)

  candidates = {}
  for name, names in torch_modules.items():
    if name not in ruled_prefixes:
      candidates[name] = _torch_kinds({leaf: values[key] for leaf, key in names.items()})
  pairs = {}
  for name, kinds in candidates.items():
    module = name.replace(".", "/")
    kind = next((k for k in kinds if module in free[k]), None)
    if kind is not None:
      free[kind].remove(module)
      pairs[name] = (module, kind)
  for name, kinds in candidates.items():
    kind = next((k for k in kinds if free[k]), None)
    if name not in pairs and kind is not None:
      pairs[name] = (free[kind].pop(0), kind)
  return [(torch_modules[name], *pairs[name]) for name in torch_modules if name in pairs]


def _torch_kinds(leaves: Mapping[str, np.ndarray]) -> tuple[str, ...]:
  """The kinds a torch module can be, in order of preference."""
  if "running_mean" in leaves and "running_var" in leaves:
    return ("batchnorm",)
  weight = leaves.get("weight")
  if weight is None:
    return ()
  if weight.ndim >= 3:
    return ("conv",)
  if weight.ndim == 2:
    # A Linear without bias looks like an Embedding; the target's modules decide.
    return ("dense",) if "bias" in leaves else ("embed", "dense")
  return ()


def _modules(flat: Mapping[str, Any]) -> dict[str, dict[tuple[str, str], str]]:
  """Flax module path ('Dense_0', 'Block_0/Dense_0'; '' for none) -> {(collection, leaf): path}."""
  modules: dict[str, dict[tuple[str, str], str]] = {}
  for path in flat:
    parts = path.split("/")
    collection = parts[0] if len(parts) > 1 else ""
    modules.setdefault("/".join(parts[1:-1]), {})[(collection, parts[-1])] = path
  return modules


def _flax_kind(leaves: Mapping[tuple[str, str], str], flat: Mapping[str, Any]) -> str | None:
  if ("params", "embedding") in leaves:
    return "embed"
  if ("batch_stats", "mean") in leaves and ("batch_stats", "var") in leaves:
    return "batchnorm"
  kernel = leaves.get(("params", "kernel"))
  if kernel is not None and len(flat[kernel].shape) >= 2:
    return "dense" if len(flat[kernel].shape) == 2 else "conv"
  return None


def _natural_key(name: str) -> list:
  # Linen numbers the modules of a type in definition order; 'Dense_2' must sort before 'Dense_10'.
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _leaf_rank(leaf: tuple[str, str]) -> tuple[bool, int, str]:
  """Sorts a Flax module's (collection, leaf)s as torch lists them: parameters, then buffers."""
  name = _TORCH_LEAF.get(leaf, leaf[1])
  order = _TORCH_LEAF_ORDER.index(name) if name in _TORCH_LEAF_ORDER else len(_TORCH_LEAF_ORDER)
  return (leaf[0] != "params", order, name)


def _compile(key_map: KeyMap | None) -> list[tuple[re.Pattern, str | None]]:
  rules = []
  for i, rule in enumerate(key_map or ()):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
      raise ValueError(f"key_map[{i}]: expected a (pattern, template) pair, got {rule!r}")
    try:
      rules.append((re.compile(rule[0]), rule[1]))
    except re.error as e:
      raise ValueError(f"key_map[{i}]: pattern {rule[0]!r} is not a regular expression: {e}") from e
  return rules


def _rename(path: str, rules: list[tuple[re.Pattern, str | None]], default: str) -> str | None:
  for pattern, template in rules:
    match = pattern.fullmatch(path)
    if match:
      return None if template is None else match.expand(template)
  return default


def _nchw_rows(nchw_flatten: NchwFlatten | None, flat: Mapping[str, Any]) -> dict[str, tuple[int, int, int]]:
  """Checks ``nchw_flatten`` against the variables; returns kernel path -> (C, H, W)."""
  rows = {}
  for module, chw in (nchw_flatten or {}).items():
    kernel = flat.get(f"{module}/kernel")
    if kernel is None or len(kernel.shape) != 2:
      raise ValueError(
          f"nchw_flatten key {module!r}: expected the path of a Dense module, e.g. "
          f"'params/Dense_0', with a 2-D kernel at {module + '/kernel'!r} in the variables")
    chw = tuple(int(n) for n in chw)
    if len(chw) != 3 or math.prod(chw) != kernel.shape[0]:
      raise ValueError(
          f"nchw_flatten[{module!r}] = {chw}: expected (C, H, W) with C*H*W equal to the "
          f"{kernel.shape[0]} input rows of {module + '/kernel'!r} (shape {tuple(kernel.shape)})")
    rows[f"{module}/kernel"] = chw
  return rows


def _torch_shape(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape of the torch tensor that fills the Flax leaf ``path`` of ``shape``."""
  if path.rpartition("/")[2] == "kernel" and len(shape) >= 2:
    return (shape[-1], shape[-2], *shape[:-2])
  return shape


def _flax_layout(value: np.ndarray, path: str, chw: tuple[int, int, int] | None) -> np.ndarray:
  """A torch tensor in Flax layout: kernels ``(O, I, *S) -> (*S, I, O)``; with ``chw``, Dense
  rows reordered from PyTorch's ``(C, H, W)`` flatten to Flax's ``(H, W, C)``. The input
  itself when nothing changes."""
  if path.rpartition("/")[2] != "kernel" or value.ndim < 2:
    return value
  value = value.transpose((*range(2, value.ndim), 1, 0))
  if chw is not None:
    c, h, w = chw
    value = value.reshape(c, h, w, value.shape[1]).transpose(1, 2, 0, 3).reshape(c * h * w, -1)
  return value


def _torch_layout(value: np.ndarray, path: str, chw: tuple[int, int, int] | None) -> np.ndarray:
  """The inverse of ``_flax_layout``."""
  if path.rpartition("/")[2] != "kernel" or value.ndim < 2:
    return value
  if chw is not None:
    c, h, w = chw
    value = value.reshape(h, w, c, value.shape[1]).transpose(2, 0, 1, 3).reshape(c * h * w, -1)
  return value.transpose((value.ndim - 1, value.ndim - 2, *range(value.ndim - 2)))


def import_torch(needs: str = "fjt.interop.torch needs PyTorch for torch tensors and .pt files"):
  """Imports PyTorch, or raises ImportError: ``needs`` (who needs it, for what), then how to
  install it."""
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"{needs}: install the torch extra with `pip install -e '.[torch]'`") from e
  return torch


def _is_torch_tensor(value: Any) -> bool:
  # Checked by type name so that numpy-only callers never import torch.
  return type(value).__module__.split(".")[0] == "torch" and hasattr(value, "detach")


def _to_numpy(value: Any) -> np.ndarray:
  """A numpy array with the same bits; for torch tensors it may share their memory."""
  if not _is_torch_tensor(value):
    return np.asarray(value)
  torch = import_torch()
  tensor = value.detach().cpu()
  for name, np_dtype, int_dtype in _BIT_CAST:
    if tensor.dtype == getattr(torch, name, None):
      return tensor.view(getattr(torch, np.dtype(int_dtype).name)).numpy().view(np_dtype)
  return tensor.numpy()


def _to_tensor(torch, value: Any):
  array = np.asarray(_to_numpy(value), order="C")
  if not array.flags.writeable:  # torch.from_numpy warns on read-only memory; copy instead.
    array = array.copy()
  for name, np_dtype, int_dtype in _BIT_CAST:
    if array.dtype == np_dtype:
      return torch.from_numpy(array.view(int_dtype)).view(getattr(torch, name))
  return torch.from_numpy(array)


def _file_type(path: str | os.PathLike) -> str:
  suffix = os.path.splitext(os.fspath(path))[1].lower()
  if suffix not in FILE_TYPES:
    raise ValueError(f"{os.fspath(path)!r}: unknown weight file type {suffix or '(no extension)'!r}; "
                     f"supported: {', '.join(FILE_TYPES)}")
  return suffix


def _write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
  path = os.fspath(path)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-",
                             suffix=os.path.splitext(path)[1])
  os.close(fd)
  try:
    write(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
