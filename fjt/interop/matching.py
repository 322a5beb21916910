"""Which PyTorch module fills which Flax module: kinds, roles and the pairing rules.

A torch module is a key's prefix before its last '.' (``layer1.0.conv1``); a Flax module the
path between collection and leaf (``BasicBlock_0/Conv_0``). Both have a kind, and within a kind
each torch leaf has a role that names its Flax leaf (``_LEAVES``). ``pair`` documents the order.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fjt.interop import layouts
from fjt.interop.files import natural_key

# For each kind of module: torch leaf name -> (collection, Flax leaf name).
LEAVES: dict[str, dict[str, tuple[str, str]]] = {
    "dense": {"weight": ("params", "kernel"), "bias": ("params", "bias")},
    "conv": {"weight": ("params", "kernel"), "bias": ("params", "bias")},
    "batchnorm": {"weight": ("params", "scale"), "bias": ("params", "bias"),
                  "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")},
    "norm": {"weight": ("params", "scale"), "bias": ("params", "bias")},  # LayerNorm, GroupNorm, RMSNorm
    "embed": {"weight": ("params", "embedding")},
}

FlaxModules = dict[str, dict[tuple[str, str], str]]


@dataclasses.dataclass(frozen=True)
class TorchModule:
  """One torch module of the source: ``leaves`` torch leaf -> key, the ``kinds`` it can be in
  order of preference, and its weight's layout where the module's class says it."""
  leaves: dict[str, str]
  kinds: tuple[str, ...]
  layout: str | None = None


def flax_modules(flat: Mapping[str, Any]) -> FlaxModules:
  """Flax module path -> {(collection, leaf): path}, in the order of ``flat`` (first leaf)."""
  modules: FlaxModules = {}
  for path in flat:
    parts = path.split("/")
    collection = parts[0] if len(parts) > 1 else ""
    modules.setdefault("/".join(parts[1:-1]), {})[(collection, parts[-1])] = path
  return modules


def definition_order(modules: Sequence[str]) -> list[str]:
  """Flax module paths in definition order, given in dict order.

  ``model.init``'s dicts are in definition order already. ``jax.tree`` operations sort dict
  keys as text ('Dense_10' before 'Dense_2'); Linen numbers the modules of one type within
  one parent in definition order, so among such siblings the numbers decide, each keeping
  the places the group holds. Order across types is the dicts' own."""
  tree: dict = {}
  for module in modules:
    node = tree
    for part in module.split("/"):
      node = node.setdefault(part, {})
  wanted, out = set(modules), []

  def walk(node: dict, prefix: str) -> None:
    names = list(node)
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
      numbered = re.fullmatch(r"(.*)_(\d+)", name)
      if numbered:
        groups.setdefault(numbered[1], []).append(i)
    for places in groups.values():
      for i, name in zip(places, sorted((names[i] for i in places), key=natural_key)):
        names[i] = name
    for name in names:
      if prefix + name in wanted:
        out.append(prefix + name)
      walk(node[name], prefix + name + "/")

  walk(tree, "")
  return out


def flax_kind(leaves: Mapping[tuple[str, str], str], flat: Mapping[str, Any]) -> str | None:
  """embed (``embedding``), batchnorm (``batch_stats`` mean and var), norm (``scale`` alone),
  dense (a 2-D ``kernel``), conv (a kernel of rank 3 or more)."""
  if ("params", "embedding") in leaves:
    return "embed"
  if ("batch_stats", "mean") in leaves and ("batch_stats", "var") in leaves:
    return "batchnorm"
  if ("params", "scale") in leaves:
    return "norm"
  kernel = leaves.get(("params", "kernel"))
  if kernel is not None and len(flat[kernel].shape) >= 2:
    return "dense" if len(flat[kernel].shape) == 2 else "conv"
  return None


def tensor_kinds(leaves: Mapping[str, np.ndarray]) -> tuple[str, ...]:
  """The kinds a torch module can be from its tensors alone, in order of preference."""
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
  return ("norm",) if weight.ndim == 1 else ()


def class_kind(module: Any) -> tuple[tuple[str, ...], str | None] | None:
  """``(kinds, weight layout)`` of a torch module from its class, None for classes not known."""
  import torch.nn as tnn
  cls = type(module)
  if cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers"):
    return ("dense",), "as_is"  # Hugging Face's Conv1D stores (in, out).
  known = ((tnn.Linear, "dense", "linear"), (tnn.modules.conv._ConvNd, "conv", "conv"),
           (tnn.Embedding, "embed", "as_is"), (tnn.modules.batchnorm._BatchNorm, "batchnorm", None),
           (tnn.LayerNorm, "norm", None), (tnn.GroupNorm, "norm", None),
           (getattr(tnn, "RMSNorm", ()), "norm", None))
  for base, kind, layout in known:
    if isinstance(module, base) and not isinstance(module, tnn.modules.conv._ConvTransposeNd):
      return (kind,), layout
  return None


def torch_modules(values: Mapping[str, np.ndarray], skip: set[str], ruled: set[str],
                  known: Mapping[str, tuple[tuple[str, ...], str | None] | None]
                  ) -> dict[str, TorchModule]:
  """The source's torch modules in source order, from its keys but ``skip`` (tied copies);
  a module with any key in ``ruled`` is left out. ``known``: module name -> ``class_kind``."""
  leaves_of: dict[str, dict[str, str]] = {}
  for key in values:
    if key not in skip:
      prefix, _, leaf = key.rpartition(".")
      leaves_of.setdefault(prefix, {})[leaf] = key
  ruled_prefixes = {key.rpartition(".")[0] for key in ruled}
  modules = {}
  for name, leaves in leaves_of.items():
    if name not in ruled_prefixes:
      kinds, layout = known.get(name) or (
          tensor_kinds({leaf: values[key] for leaf, key in leaves.items()}), None)
      modules[name] = TorchModule(leaves, kinds, layout)
  return modules


def free_modules(flax: FlaxModules, flat: Mapping[str, Any], filled: set[str]) -> dict[str, list[str]]:
  """Kind -> the Flax modules of that kind with no leaf in ``filled``, in definition order."""
  free: dict[str, list[str]] = {kind: [] for kind in LEAVES}
  for path in definition_order(list(flax)):
    kind = flax_kind(flax[path], flat)
    if kind and not filled & set(flax[path].values()):
      free[kind].append(path)
  return free


def role_path(kind: str, module: str, leaf: str) -> str | None:
  collection, name = LEAVES[kind].get(leaf, (None, None))
  return None if name is None else f"{collection}/{module}/{name}" if module else f"{collection}/{name}"


def kernel_layouts(value: np.ndarray, known: str | None) -> tuple[str, ...]:
  """The layouts a torch weight filling a Flax ``kernel`` may have."""
  if known is not None:
    return (known,)
  return ("conv",) if value.ndim >= 3 else ("linear", "as_is")


def fits(module: TorchModule, path: str, kind: str, values: Mapping[str, np.ndarray],
         flax: FlaxModules, flat: Mapping[str, Any], rows: Mapping[str, Any]) -> bool:
  """Whether every role leaf of the torch ``module`` fits the Flax module ``path``'s shapes,
  and every Flax leaf is filled."""
  filled = set()
  for leaf, key in module.leaves.items():
    target = role_path(kind, path, leaf)
    if target is None:
      continue
    if target not in flat:
      return False
    shape = tuple(flat[target].shape)
    if target.endswith("/kernel"):
      options = kernel_layouts(values[key], module.layout)
      if not any(layouts.to_flax(values[key], lay, shape, False, rows.get(target)) is not None
                 for lay in options):
        return False
    elif values[key].shape != shape:
      return False
    filled.add(target)
  return filled == set(flax[path].values())


class AmbiguousMatch(ValueError):
  """Names and shapes do not decide which torch module fills which Flax module."""


def pair(torch_modules: Mapping[str, TorchModule], free: Mapping[str, list[str]], ordered: bool,
         values: Mapping[str, np.ndarray], flax: FlaxModules, flat: Mapping[str, Any],
         rows: Mapping[str, Any]) -> dict[str, tuple[str, str, bool]]:
  """Torch module name -> ``(Flax module path, kind, paired by name)``.

  ``free`` lists the Flax modules of each kind still to fill, in definition order; it is
  consumed. First by name: a torch module whose name with '.' read as '/' is a free Flax
  module of one of its kinds (``to_state_dict``'s default names; not the root module ''). Then, for an ``ordered``
  source, by order within each kind: the i-th remaining torch module of a kind, in source
  order, fills the i-th remaining Flax module of that kind, in definition order. For a
  source without order, by shape only where that is unique both ways; any other remaining
  module that fits more than one raises ``AmbiguousMatch``.
  """
  pairs: dict[str, tuple[str, str, bool]] = {}
  for name, module in torch_modules.items():
    path = name.replace(".", "/")
    kind = next((k for k in module.kinds if path in free[k]), None) if name else None
    if kind is not None:
      free[kind].remove(path)
      pairs[name] = (path, kind, True)
  rest = {name: module for name, module in torch_modules.items() if name not in pairs}
  if ordered:
    for name, module in rest.items():
      kind = next((k for k in module.kinds if free[k]), None)
      if kind is not None:
        pairs[name] = (free[kind].pop(0), kind, False)
    return pairs

  def options(name):
    module = rest[name]
    return [(path, kind) for kind in module.kinds for path in free[kind]
            if fits(module, path, kind, values, flax, flat, rows)]

  progress = True
  while progress:
    progress = False
    fitting = {name: options(name) for name in rest if name not in pairs}
    for name, found in fitting.items():
      if len(found) != 1:
        continue
      path, kind = found[0]
      if sum((path, kind) in other for other in fitting.values()) == 1:  # Unique both ways.
        free[kind].remove(path)
        pairs[name] = (path, kind, False)
        progress = True
  ambiguous = {name: found for name in rest if name not in pairs and len(found := options(name)) > 1}
  if ambiguous:
    paths = sorted({path for found in ambiguous.values() for path, _ in found})
    example = next(iter(ambiguous))
    raise AmbiguousMatch(
        f"the source keeps no order of its modules (a .safetensors file stores its keys "
        f"sorted), and neither names nor shapes decide which of the torch modules "
        f"{sorted(ambiguous)} fills which of the Flax modules {paths}; matching them by order "
        f"would be a guess that can swap two same-shaped layers. Pass key_map rules: "
        f"(r'{example.replace('.', chr(92) + '.')}\\..*', '<Flax module>') sends every tensor "
        f"of {example!r} to the Flax module named, by role; or pass the torch module itself or "
        f"a .pt state_dict, which keep the module order")
  return pairs
