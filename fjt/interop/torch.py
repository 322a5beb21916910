"""PyTorch ``state_dict`` or ``nn.Module`` <-> fjt variables, that never loads silently wrong.

``from_state_dict`` fills a Flax variables tree ``{"params": ..., "batch_stats": ...}`` from a
PyTorch module or ``state_dict`` (name -> tensor or array) and reports what went where;
``to_state_dict(variables, like=report)`` writes the same torch keys back, so the source
module's ``load_state_dict(strict=True)`` takes them. Layouts (PyTorch -> Flax; the reverse on
export; see ``fjt.interop.layouts``):

  Linear.weight (out, in)                 -> Dense.kernel (in, out)              "linear"
  Hugging Face Conv1D.weight (in, out)    -> Dense.kernel (in, out)              "as_is"
  ConvNd.weight (out, in, *spatial)       -> Conv.kernel (*spatial, in, out)     "conv"
  BatchNorm.weight, .bias                 -> params/BatchNorm_i/scale, bias
  BatchNorm.running_mean, .running_var    -> batch_stats/BatchNorm_i/mean, var
  BatchNorm.num_batches_tracked           -> not used (Flax keeps no count); kept in the report
  LayerNorm / GroupNorm / RMSNorm .weight, .bias -> scale, bias
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
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.core
import jax
import jax.numpy as jnp
import numpy as np

from fjt.interop import architectures, layouts, matching
from fjt.interop.files import (FILE_TYPES, SortedStateDict, WeightFileError, import_torch,
                               load_file, natural_key, save_file, to_torch, _to_numpy)
from fjt.models.cnn import CNN
from fjt.models.gpt import GPT
from fjt.models.resnet import ResNet
from fjt.tree import flatten, unbox, unflatten

PyTree = Any
# (pattern, template) or (pattern, template, layout); a template is a Flax path, a Flax module
# path, a tuple of those (a fused tensor split along its first axis), or None (drop the key).
KeyMap = Sequence[tuple]
NchwFlatten = Mapping[str, Sequence[int]]

__all__ = ["DEFAULT_EXPORT_KEY_MAPS", "DEFAULT_KEY_MAPS", "FILE_TYPES", "GPT2_EXPORT_KEY_MAP", "GPT2_KEY_MAP", "ImportReport", "SortedStateDict", "StateDictMismatch", "WeightFileError",
           "abstract_variables", "cnn_nchw_flatten", "from_state_dict", "import_torch", "load_file",
           "register_key_map", "save_file", "to_state_dict", "to_torch"]

# Hugging Face GPT2LMHeadModel (or GPT2Model: no "transformer." prefix) -> fjt.models.GPT, whose
# modules carry GPT-2's names; c_attn, c_proj and c_fc are Conv1D, stored (in, out). The tied
# lm_head.weight is a copy of wte.weight.
_HF = r"(?:transformer\.)?"
GPT2_KEY_MAP: KeyMap = (
    (_HF + r"(wte|wpe)\.weight", r"params/\1/embedding"),
    (_HF + r"h\.(\d+)\.(ln_1|ln_2)\.(weight|bias)", r"h_\1/\2"),
    (_HF + r"h\.(\d+)\.(attn|mlp)\.(c_attn|c_proj|c_fc)\.(weight|bias)", r"h_\1/\2/\3", "as_is"),
    (_HF + r"ln_f\.(weight|bias)", "ln_f"),
)

# The reverse: fjt.models.GPT's Flax paths -> GPT2LMHeadModel's keys, Conv1D weights as they are
# (the tied lm_head.weight is not written: transformers ties it, as its own files do).
GPT2_EXPORT_KEY_MAP: KeyMap = (
    (r"params/(wte|wpe)/embedding", r"transformer.\1.weight"),
    (r"params/h_(\d+)/(attn|mlp)/(c_attn|c_proj|c_fc)/kernel", r"transformer.h.\1.\2.\3.weight",
     "as_is"),
    (r"params/h_(\d+)/(attn|mlp)/(c_attn|c_proj|c_fc)/bias", r"transformer.h.\1.\2.\3.bias"),
    (r"params/h_(\d+)/(ln_1|ln_2)/scale", r"transformer.h.\1.\2.weight"),
    (r"params/h_(\d+)/(ln_1|ln_2)/bias", r"transformer.h.\1.\2.bias"),
    (r"params/ln_f/scale", "transformer.ln_f.weight"),
    (r"params/ln_f/bias", "transformer.ln_f.bias"),
)

# Target model class -> the key map ``from_state_dict`` uses when given none and the map covers
# every key of the source (``register_key_map`` adds one); and the reverse map
# ``to_state_dict`` uses when given none and the map names every leaf of the variables.
DEFAULT_KEY_MAPS: dict[type, KeyMap] = {GPT: GPT2_KEY_MAP}
# A value may also be a function of the '/'-joined leaves that returns the rules (ResNet's below).
DEFAULT_EXPORT_KEY_MAPS: dict[type, Any] = {GPT: GPT2_EXPORT_KEY_MAP}


def register_key_map(model: type, key_map: KeyMap, export_key_map: KeyMap | None = None) -> None:
  """Makes ``key_map`` the default of ``from_state_dict`` for the targets of ``model`` (an fjt
  model class): used when no ``key_map`` is given and it covers every key of the source.
  ``export_key_map`` (Flax path -> torch key rules): the default of ``to_state_dict`` for
  variables whose every leaf it names, so the model exports with its twin's names."""
  _compile(key_map)  # Fails now, not at import time.
  DEFAULT_KEY_MAPS[model] = tuple(key_map)
  if export_key_map is not None:
    _compile(export_key_map)
    DEFAULT_EXPORT_KEY_MAPS[model] = tuple(export_key_map)


_TORCH_LEAF = {flax: name for table in matching.LEAVES.values() for name, flax in table.items()}
_TORCH_LEAF_ORDER = ("weight", "bias", "running_mean", "running_var")  # As torch lists them.
_COUNTER = "num_batches_tracked"


BATCH_NORM_NOTE = (
    "BatchNorm: PyTorch updates running_var with the unbiased batch variance (n / (n - 1)), "
    "Flax's nn.BatchNorm with the biased one, so continued training drifts from PyTorch's "
    "unless the model updates as PyTorch (fjt.models.ResNet(unbiased_running_var=True)); "
    "momentum: Flax's is 1 - PyTorch's")


class StateDictMismatch(ValueError):
  """A strict import left Flax paths without a value or torch keys unused."""


@dataclasses.dataclass(frozen=True)
class ImportReport:
  """What ``from_state_dict`` did, by torch key and '/'-joined Flax path.

  Attributes:
    matched: torch key -> Flax path of every value used, in source order; a tuple of paths
      for a fused tensor split by a rule (``in_proj_weight`` -> q, k, v kernels).
    reshaped: the entries of ``matched`` whose layout changed (transposed, permuted, split or
      reshaped).
    unmatched: Flax paths that got no value; they keep the target's leaf.
    unused: torch keys whose value was not used, BatchNorm's ``num_batches_tracked`` among
      them (never an error: Flax keeps no count; its value is in ``counters``).
    layouts: torch key -> the layout its value was read in ("linear", "conv", "as_is").
    tied: torch key -> the earlier key whose tensor it shares (GPT-2's ``lm_head.weight`` ->
      ``transformer.wte.weight``), for the duplicates of a matched key.
    counters: ``num_batches_tracked`` key -> its value.
    notes: what the weights do not carry and continued training depends on
      (``BATCH_NORM_NOTE`` when running statistics were imported).
    tensors: every torch key of the source, in source order -> (shape, numpy dtype).
  """
  matched: Mapping[str, str | tuple[str, ...]]
  reshaped: Mapping[str, str | tuple[str, ...]]
  unmatched: tuple[str, ...]
  unused: tuple[str, ...]
  layouts: Mapping[str, str] = dataclasses.field(default_factory=dict)
  tied: Mapping[str, str] = dataclasses.field(default_factory=dict)
  counters: Mapping[str, int] = dataclasses.field(default_factory=dict)
  tensors: Mapping[str, tuple[tuple[int, ...], np.dtype]] = dataclasses.field(default_factory=dict)
  notes: tuple[str, ...] = ()


class _ShapeMismatch(ValueError):
  """A torch tensor that does not fit the Flax leaf it was sent to."""


@dataclasses.dataclass(frozen=True)
class _Rule:
  pattern: re.Pattern
  templates: tuple[str, ...] | None
  layout: str | None


def from_state_dict(source: Any, variables: PyTree, key_map: KeyMap | None = None,
                    strict: bool = True,
                    nchw_flatten: NchwFlatten | None = None) -> tuple[PyTree, ImportReport]:
  """Fills Flax ``variables`` from a PyTorch module or ``state_dict``.

  Args:
    source: a ``torch.nn.Module`` (each tensor's layout then comes from its module's class),
      or a ``state_dict``: torch key -> ``torch.Tensor`` or array, e.g. ``module.state_dict()``
      or ``load_file(path)``. A module, a state_dict as PyTorch returns it and a ``.pt``
      file keep the source's module order; a ``.safetensors`` file (``SortedStateDict``)
      does not, and is never matched by order.
    variables: the target: nested dicts of arrays or ``jax.ShapeDtypeStruct``, e.g.
      ``fjt.init_variables(model, x, rng)`` or ``abstract_variables(model, x)``. It fixes every
      shape and dtype, and its dict order (Flax's ``init`` order, which is definition order)
      drives matching by order; ``jax.tree`` operations such as ``jax.eval_shape`` sort dict
      keys, which keeps the order of modules of one type at one level but not across types.
    key_map: rules tried in order on every torch key, the first whose ``pattern``
      ``re.fullmatch``-es the key deciding: ``(pattern, template)`` or ``(pattern, template,
      layout)``. ``match.expand(template)`` is a Flax leaf path (``params/Dense_2/kernel``),
      or a Flax module path (``BatchNorm_0``: the key's last part then picks the leaf by role,
      ``running_mean`` -> ``batch_stats/BatchNorm_0/mean``), or a tuple of those: the tensor
      is split along its first axis into that many equal parts (a fused q/k/v projection).
      A template of None drops the key (reported unused, never an error). ``layout`` (see
      ``fjt.interop.layouts``) fixes how the tensor's axes are read; a rule's value may also
      be reshaped (row-major) to its leaf. A torch module with any key taken by a rule, and a
      Flax module with any leaf filled by one, are left out of automatic matching. None (the
      default): the first of ``DEFAULT_KEY_MAPS`` (e.g. ``GPT2_KEY_MAP`` for ``fjt.models.GPT``)
      whose rules send every key of the source to the target, else none; ``[]``: none.
    strict: if True (the default, like ``load_state_dict``), any Flax path left without a
      value and any torch key left unused (other than ``num_batches_tracked``, keys dropped by
      a rule, and tied copies: keys whose tensor shares memory with, or equals bit for bit, a
      used one, such as GPT-2's ``lm_head.weight``) raise ``StateDictMismatch`` naming all of them.
      If False, they are listed in the report and the target keeps its leaves.
    nchw_flatten: Flax Dense module path -> ``(C, H, W)``, for a Dense whose torch counterpart
      took input flattened from NCHW features; see ``cnn_nchw_flatten``.

  Automatic matching pairs whole modules, then leaves by role. Kinds: a torch module's from
  its class for a module source (Linear, Hugging Face Conv1D -> dense; ConvNd -> conv;
  Embedding -> embed; BatchNorm -> batchnorm; LayerNorm, GroupNorm, RMSNorm -> norm), else
  from its tensors (``running_mean`` and ``running_var`` -> batchnorm; a ``weight`` of rank
  >= 3 -> conv, 2 -> dense, or embed when it has no bias, 1 -> norm); a Flax module's from
  its leaves (``matching.flax_kind``). In this order:
    1. by name: a torch module whose name with '.' read as '/' is a Flax module of its kind
       (``to_state_dict``'s default names come back; their 2-D weights are in its "linear"
       layout);
    2. a source with order: within each kind, the i-th remaining torch module in source
       order (PyTorch's registration order) fills the i-th remaining Flax module in the
       target's definition order: ``conv1``, ``layer1.0.conv1``, ... fill ``Conv_0``,
       ``BasicBlock_0/Conv_0``, ...;
    3. a source without order: if every key is a name whose order is known (``NAME_ORDERS``:
       torchvision's ResNet names), in that order as in 2.; else by shapes where exactly one
       torch module fits exactly one Flax module; where two or more fit, an error that asks
       for a key_map.
  A weight's layout comes from the rule, else its module's class, else its shape: rank >= 3 is
  "conv"; a 2-D (a, b) is "linear" if the kernel is (b, a) and "as_is" if it is (a, b), and a
  square one is an error asking for the module or a rule, never a guess.

  Returns:
    ``(variables, report)``: the target's tree (same dict order) with every matched leaf
    replaced by a jax array of the target leaf's shape and dtype (cast from the torch dtype;
    placed on the target's sharding when it has a multi-device one), and an ``ImportReport``.

  Raises:
    StateDictMismatch (a ValueError): a strict import with unmatched paths or unused keys.
    ValueError: a value's shape does not fit its Flax path (the message names both), a square
      2-D weight of unknown layout, modules of a source without order that only order could
      pair, a rule naming a path the target lacks, two keys filling one path, or
      ``nchw_flatten`` not fitting the target.
  """
  values, ordered, torch_classes = _read_source(source)
  if not ordered and (named := _order_from_names(values)) is not None:
    values, ordered = named, True  # A sorted file whose names are a known twin's: names decide.
  variables = unbox(variables)  # model.init's logical-partitioning boxes, if any.
  tied = _ties(values)
  target = _ordered_flat(variables)
  flax = matching.flax_modules(target)
  rows = _nchw_rows(nchw_flatten, target)
  rules, default = _compile(key_map), None
  if key_map is None:
    default, rules = _default_key_map(values, tied, target, flax)
  filled: dict[str, np.ndarray] = {}
  matched: dict[str, str | tuple[str, ...]] = {}
  reshaped: dict[str, str | tuple[str, ...]] = {}
  read_as: dict[str, str] = {}
  known = {name: matching.class_kind(module) for name, module in torch_classes.items()}

  def fill(key: str, paths: tuple[str, ...], layout: str | None, reshape: bool) -> None:
    value = values[key]
    if len(paths) > 1 and (value.ndim == 0 or value.shape[0] % len(paths)):
      raise ValueError(f"torch key {key!r} of shape {value.shape} does not split into "
                       f"{len(paths)} equal parts along its first axis for {list(paths)}")
    parts = np.split(value, len(paths)) if len(paths) > 1 else [value]
    for part, path in zip(parts, paths):
      if path in filled:
        other = next(k for k, p in matched.items() if path in ((p,) if isinstance(p, str) else p))
        raise ValueError(f"torch keys {other!r} and {key!r} both map to Flax path {path!r}")
      leaf = target[path]
      shape = tuple(leaf.shape)
      lay = layout or _infer_layout(key, part, path, shape)
      converted = layouts.to_flax(part, lay, shape, reshape, rows.get(path))
      if converted is None:
        raise _ShapeMismatch(
            f"torch key {key!r} has shape {part.shape}, but Flax path {path!r} has shape "
            f"{shape} and takes a torch tensor of shape {layouts.torch_shape(lay, shape)} "
            f"(layout {lay!r})")
      filled[path] = np.array(converted, dtype=leaf.dtype, order="C")  # A copy: torch may reuse its memory.
      read_as[key] = lay
      if converted is not value:
        reshaped[key] = paths[0] if len(paths) == 1 else paths
    matched[key] = paths[0] if len(paths) == 1 else paths

  def class_layout(key: str) -> str | None:
    prefix, _, leaf = key.rpartition(".")
    return known[prefix][1] if leaf == "weight" and known.get(prefix) else None

  ruled, dropped = set(), set()
  for key in values:
    rule, match = next(((r, m) for r in rules if (m := r.pattern.fullmatch(key))), (None, None))
    if rule is None:
      continue
    ruled.add(key)
    if rule.templates is None:
      dropped.add(key)
      continue
    try:
      paths = tuple(_rule_path(key, match.expand(t), rule, target, flax) for t in rule.templates)
      # A module rule's layout is its weight's; its other leaves are read as they are.
      to_module = not any(match.expand(t) in target for t in rule.templates)
      layout = None if to_module and key.rpartition(".")[2] != "weight" else rule.layout
      if None not in paths:  # None: a module rule's num_batches_tracked.
        fill(key, paths, layout or class_layout(key), reshape=True)
    except ValueError as e:
      if default is None:
        raise
      raise ValueError(f"{e} (with the default key map for {default}, used because it covers "
                       f"every key of the source; pass key_map=[] to match automatically)") from e

  candidates = matching.torch_modules(values, set(tied), ruled, known)
  free = matching.free_modules(flax, target, set(filled))
  pairs = matching.pair(candidates, free, ordered, values, flax, target, rows)
  for name, (module, kind, by_name) in pairs.items():
    for leaf, key in candidates[name].leaves.items():
      path = matching.role_path(kind, module, leaf)
      if path is None or path not in target:
        continue
      layout = candidates[name].layout if path.endswith("/kernel") else None
      if layout is None and by_name and path.endswith("/kernel") and values[key].ndim == 2:
        layout = "linear"  # to_state_dict writes Dense kernels as nn.Linear weights.
      try:
        fill(key, (path,), layout, reshape=False)
      except _ShapeMismatch as e:
        if by_name:
          raise
        theirs = _kind_counts(m.kinds[0] for m in candidates.values() if m.kinds)
        ours = _kind_counts(k for m in flax.values() if (k := matching.flax_kind(m, target)))
        if theirs != ours:  # Not this model's twin: no remedy on the fjt side would help.
          raise ValueError(
              f"{e}. The source is another architecture than the target: its modules are "
              f"{theirs}, the target's {ours}. Import a model's own torch twin, or a Hugging "
              f"Face folder with fjt.interop.hf.from_pretrained (model types: "
              f"{', '.join(architectures.supported())})") from e
        raise ValueError(
            f"{e}. Torch module {name!r} was paired with Flax module {module!r} by order "
            f"({kind} modules in source order against the target's dict order); a target "
            f"that went through jax.eval_shape or jax.tree.map has its dict keys sorted, so "
            f"build it with abstract_variables(model, x), or pass key_map rules") from e

  counters = {key: int(value) for key, value in values.items()
              if key.rpartition(".")[2] == _COUNTER and value.ndim == 0}
  tied = {key: first for key, first in tied.items() if first in matched and key not in matched}
  for key in values:  # A copy of a used tensor (a tie saved without shared memory) loses nothing.
    if key not in matched and key not in tied and key not in counters:
      twin = _equal_to(values, key, matched)
      if twin is not None:
        tied[key] = twin
  report = ImportReport(
      matched=matched, reshaped=reshaped,
      unmatched=tuple(p for p in target if p not in filled),
      unused=tuple(k for k in values if k not in matched and k not in tied),
      layouts=read_as, tied=tied, counters=counters,
      tensors={key: (tuple(value.shape), value.dtype) for key, value in values.items()},
      notes=(BATCH_NORM_NOTE,) if any(p.startswith("batch_stats/") for p in filled) else ())
  unused = [k for k in report.unused if k not in counters and k not in dropped]
  if strict and (report.unmatched or unused):
    raise StateDictMismatch(
        f"strict import: {len(report.unmatched)} Flax paths got no value: "
        f"{list(report.unmatched)}; {len(unused)} torch keys were not used: {unused}. Map them "
        f"with key_map rules, or pass strict=False to keep the target's values for the "
        f"unmatched paths (the report lists both)")
  return _with_leaves(variables, filled), report


def abstract_variables(model, example_x: Any) -> PyTree:
  """``fjt.init_variables(model, example_x, rng)``'s shapes and dtypes as
  ``jax.ShapeDtypeStruct``, nothing computed, in definition order (``jax.eval_shape``
  alone sorts dict keys): the target ``from_state_dict`` matches by order."""
  from fjt.state import init_variables  # Local: fjt.state imports the optimizer stack.
  order: list[str] = []

  def init():
    variables = init_variables(model, example_x, jax.random.PRNGKey(0))
    order.extend(_ordered_flat(variables))
    return variables

  shapes = flatten(jax.eval_shape(init))
  return unflatten({path: shapes[path] for path in order})


def to_state_dict(variables: PyTree, key_map: KeyMap | None = None,
                  nchw_flatten: NchwFlatten | None = None,
                  like: ImportReport | None = None) -> dict[str, np.ndarray]:
  """The PyTorch ``state_dict`` of Flax ``variables``: dotted keys, torch layouts and dtypes.

  With ``like``, the report of the ``from_state_dict`` that made ``variables``: the source's
  own keys in its order, each in the layout, shape and dtype it was read in (split tensors
  fused back), tied duplicates as the same array and ``num_batches_tracked`` with its value,
  so the source module's ``load_state_dict(..., strict=True)`` takes ``to_torch`` of it and
  gets back bit for bit what it had wherever fjt did not change the values. Keys the import
  left unused are not written (a strict import has none but counters and tied keys).

  Without ``like`` and ``key_map``, a model with a known torch twin exports with the twin's
  names and layouts: the first of ``DEFAULT_EXPORT_KEY_MAPS`` whose rules name every leaf
  (``fjt.models.GPT`` -> Hugging Face ``GPT2LMHeadModel``'s keys, Conv1D weights (in, out);
  ``fjt.models.ResNet`` -> torchvision's ``conv1``, ``layer1.0.bn1``, ..., ``fc``, in its order).
  Otherwise default names keep the Flax module path: ``params/Dense_0/kernel`` ->
  ``Dense_0.weight`` (Dense kernels as ``nn.Linear`` weights), ``params/BatchNorm_0/scale`` ->
  ``BatchNorm_0.weight``, ``batch_stats/BatchNorm_0/mean`` -> ``BatchNorm_0.running_mean``,
  ``params/Embed_0/embedding`` -> ``Embed_0.weight``, nested modules dotted
  (``Block_0.Dense_0.weight``): the state_dict of a torch module whose attributes carry the
  Flax names, which ``from_state_dict`` matches back by name. For other names give
  ``key_map``: ``(pattern, template)`` rules ``re.fullmatch``-ed on the '/'-joined Flax path,
  the first match naming the torch key ``match.expand(template)``; a template of ``None``
  leaves the leaf out; a rule's layout (``(pattern, template, layout)``) is how the leaf is
  written (``"as_is"``: unchanged, ``"linear"``: transposed), whatever its rank. Every BatchNorm also gets ``<module>.num_batches_tracked =
  np.int64(0)`` after its ``running_var``; PyTorch reads that count only for
  ``momentum=None``, which fjt does not track.

  Args:
    variables: ``{"params", "batch_stats"}`` (or any tree of arrays).
    key_map: Flax path -> torch key rules, as above (not with ``like``).
    nchw_flatten: as in ``from_state_dict``; rows go back to PyTorch's NCHW flatten order.
    like: an ``ImportReport``, as above.

  Returns:
    torch key -> C-contiguous numpy array. Without ``like``, modules in natural order of their
    Flax paths (``Dense_2`` before ``Dense_10``), within a module weight, bias, running_mean,
    running_var, num_batches_tracked, dtypes kept (bfloat16 as ``ml_dtypes.bfloat16``).

  Raises:
    ValueError: two Flax paths map to one torch key, ``nchw_flatten`` does not fit, or
      ``like`` names a Flax path that ``variables`` lacks.
  """
  flat = _ordered_flat(variables)
  rows = _nchw_rows(nchw_flatten, flat)
  if like is not None:
    if key_map:
      raise ValueError("to_state_dict: pass key_map or like, not both (like has the names)")
    return _like(flat, like, rows)
  rules = _compile(_default_export_map(flat) if key_map is None else key_map)
  out: dict[str, np.ndarray] = {}
  sources: dict[str, str] = {}

  def emit(key: str, value: np.ndarray, path: str) -> None:
    if key in out:
      raise ValueError(f"Flax paths {sources[key]!r} and {path!r} both map to torch key {key!r}")
    out[key], sources[key] = value, path

  modules = matching.flax_modules(flat)
  for module, leaves in sorted(modules.items(), key=lambda item: natural_key(item[0])):
    keys = {}
    for (collection, leaf), path in sorted(leaves.items(), key=lambda item: _leaf_rank(item[0])):
      keys[leaf] = key = _rename(path, rules, default=".".join(
          p for p in (module.replace("/", "."), _TORCH_LEAF.get((collection, leaf), leaf)) if p))
      if key is not None:
        value = np.asarray(jax.device_get(flat[path]))
        layout = _rule_layout(path, rules)
        if layout is not None:  # The rule's layout, never ignored.
          value = layouts.to_torch(value, layout, layouts.torch_shape(layout, value.shape),
                                   rows.get(path))
        elif leaf == "kernel" and value.ndim >= 2:
          layout = "linear" if value.ndim == 2 else "conv"
          value = layouts.to_torch(value, layout, layouts.torch_shape(layout, value.shape),
                                   rows.get(path))
        # order="C", not np.ascontiguousarray, which turns 0-d arrays into 1-d ones.
        emit(key, np.asarray(value, order="C"), path)
    if matching.flax_kind(leaves, flat) == "batchnorm" and keys["mean"] is not None:
      prefix = keys["mean"].rpartition(".")[0]
      emit(f"{prefix}.{_COUNTER}" if prefix else _COUNTER, np.array(0, np.int64),
           leaves[("batch_stats", "mean")])
  return _order_from_names(out) or out  # Names whose order is known (torchvision's): that order.


def _like(flat: Mapping[str, Any], like: ImportReport,
          rows: Mapping[str, tuple[int, int, int]]) -> dict[str, np.ndarray]:
  out: dict[str, np.ndarray] = {}
  for key, (shape, dtype) in like.tensors.items():
    if key in like.matched:
      paths = like.matched[key]
      paths = (paths,) if isinstance(paths, str) else paths
      missing = [path for path in paths if path not in flat]
      if missing:
        raise ValueError(f"to_state_dict(like=report): torch key {key!r} was imported from Flax "
                         f"paths {missing}, which the variables do not have")
      part = (shape[0] // len(paths), *shape[1:]) if len(paths) > 1 else shape
      parts = [layouts.to_torch(np.asarray(jax.device_get(flat[path])), like.layouts[key], part,
                                rows.get(path)) for path in paths]
      value = parts[0] if len(parts) == 1 else np.concatenate(parts)
      out[key] = np.array(value, dtype=dtype, order="C")
    elif key in like.tied:
      out[key] = out[like.tied[key]]
    elif key in like.counters:
      out[key] = np.array(like.counters[key], dtype)
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




def _leaf_rank(leaf: tuple[str, str]) -> tuple[bool, int, str]:
  """Sorts a Flax module's (collection, leaf)s as torch lists them: parameters, then buffers."""
  name = _TORCH_LEAF.get(leaf, leaf[1])
  order = _TORCH_LEAF_ORDER.index(name) if name in _TORCH_LEAF_ORDER else len(_TORCH_LEAF_ORDER)
  return (leaf[0] != "params", order, name)



def _compile(key_map: KeyMap | None) -> list[_Rule]:
  rules = []
  for i, rule in enumerate(key_map or ()):
    if not (isinstance(rule, (tuple, list)) and len(rule) in (2, 3)):
      raise ValueError(f"key_map[{i}]: expected (pattern, template) or (pattern, template, "
                       f"layout), got {rule!r}")
    pattern, template, *layout = rule
    try:
      compiled = re.compile(pattern)
    except re.error as e:
      raise ValueError(f"key_map[{i}]: pattern {pattern!r} is not a regular expression: {e}") from e
    if template is not None and not isinstance(template, str):
      template = tuple(template)
      if not template or not all(isinstance(t, str) for t in template):
        raise ValueError(f"key_map[{i}]: a template is a string, a tuple of strings or None, "
                         f"got {rule[1]!r}")
    templates = (template,) if isinstance(template, str) else template
    layout = layouts.check(layout[0], f"key_map[{i}]") if layout and layout[0] else None
    rules.append(_Rule(compiled, templates, layout))
  return rules


# Names that fix their modules' registration order, for sources that keep no order (a
# .safetensors file): pattern on every key -> the sort key of a match. torchvision's ResNets:
# conv1, bn1, layer{L}.{B}.(conv1, bn1, conv2, bn2, conv3, bn3, downsample.0, downsample.1), fc,
# the order fjt.models.ResNet defines its modules in.
_TORCHVISION_RESNET = re.compile(
    r"(?:(conv1|bn1)|layer(\d+)\.(\d+)\.(conv1|bn1|conv2|bn2|conv3|bn3|downsample\.0|downsample\.1)"
    r"|(fc))\.(weight|bias|running_mean|running_var|num_batches_tracked)")
_RESNET_PARTS = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample.0", "downsample.1")
_LEAF_ORDER = (*_TORCH_LEAF_ORDER, _COUNTER)


def _torchvision_resnet_order(match: re.Match) -> tuple:
  stem, layer, block, part, fc, leaf = match.groups()
  where = (0, 0, 0, _RESNET_PARTS.index(stem)) if stem else (2, 0, 0, 0) if fc else (
      1, int(layer), int(block), _RESNET_PARTS.index(part))
  return (*where, _LEAF_ORDER.index(leaf))


NAME_ORDERS: list[tuple[re.Pattern, Any]] = [(_TORCHVISION_RESNET, _torchvision_resnet_order)]


def _order_from_names(values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
  """``values`` in its modules' registration order when every key matches one of
  ``NAME_ORDERS``' patterns (a twin whose names fix the order); None otherwise."""
  for pattern, order in NAME_ORDERS:
    matches = {key: pattern.fullmatch(key) for key in values}
    if values and all(matches.values()):
      return {key: values[key] for key in sorted(values, key=lambda k: order(matches[k]))}
  return None


def _kind_counts(kinds) -> dict[str, int]:
  counts: dict[str, int] = {}
  for kind in kinds:
    counts[kind] = counts.get(kind, 0) + 1
  return dict(sorted(counts.items()))


def _rule_layout(path: str, rules: list[_Rule]) -> str | None:
  """The layout of the first rule matching ``path`` (None: no rule, or a rule without one)."""
  rule = next((r for r in rules if r.pattern.fullmatch(path)), None)
  return None if rule is None else rule.layout


def torchvision_resnet_export_map(flat: Mapping[str, Any]) -> KeyMap:
  """Flax path -> torchvision key rules for the variables of an ``fjt.models.ResNet``: stem
  ``Conv_0`` / ``BatchNorm_0`` -> ``conv1`` / ``bn1``, block ``j`` -> ``layer{L}.{i}`` (a block
  with a projection starts a stage, as every stage but a first without one does), its convs and
  BatchNorms -> ``conv1..3`` / ``bn1..3`` and the projection -> ``downsample.0`` / ``.1``,
  ``Dense_0`` -> ``fc``. Empty for variables that are not a ResNet's."""
  modules = matching.flax_modules(flat)
  blocks = sorted({m.split("/")[0] for m in modules if re.fullmatch(r"(BasicBlock|Bottleneck)_\d+", m.split("/")[0])},
                  key=natural_key)
  if not blocks or not {"Conv_0", "BatchNorm_0", "Dense_0"} <= set(modules):
    return ()
  names = {"Conv_0": "conv1", "BatchNorm_0": "bn1", "Dense_0": "fc"}
  layer, index = 0, 0
  for j, block in enumerate(blocks):
    convs = 3 if block.startswith("Bottleneck") else 2
    projected = f"{block}/Conv_{convs}" in modules
    layer, index = (layer + 1, 0) if j == 0 or projected else (layer, index + 1)
    for k in range(convs + projected):
      where = f"layer{layer}.{index}." + (f"{{}}{k + 1}" if k < convs else "downsample.{}")
      names[f"{block}/Conv_{k}"] = where.format("conv" if k < convs else 0)
      names[f"{block}/BatchNorm_{k}"] = where.format("bn" if k < convs else 1)
  if set(modules) - set(names):
    return ()
  rules = []
  for module, torch_name in names.items():
    m = re.escape(module)
    rules += [(rf"params/{m}/(kernel|scale)", f"{torch_name}.weight"),
              (rf"params/{m}/bias", f"{torch_name}.bias"),
              (rf"batch_stats/{m}/mean", f"{torch_name}.running_mean"),
              (rf"batch_stats/{m}/var", f"{torch_name}.running_var")]
  return tuple(rules)


DEFAULT_EXPORT_KEY_MAPS[ResNet] = torchvision_resnet_export_map


def _default_export_map(flat: Mapping[str, Any]) -> KeyMap:
  """The first of ``DEFAULT_EXPORT_KEY_MAPS`` whose rules name every leaf of ``flat``: a model
  with a known torch twin exports with the twin's names and layouts; else none. A value may be
  a function of ``flat`` that returns the rules (empty where it does not apply)."""
  for key_map in DEFAULT_EXPORT_KEY_MAPS.values():
    key_map = key_map(flat) if callable(key_map) else key_map
    rules = _compile(key_map)
    if flat and all(any(r.pattern.fullmatch(path) for r in rules) for path in flat):
      return key_map
  return ()


def _rename(path: str, rules: list[_Rule], default: str) -> str | None:
  for rule in rules:
    match = rule.pattern.fullmatch(path)
    if match:
      return None if rule.templates is None else match.expand(rule.templates[0])
  return default


def _default_key_map(values: Mapping[str, np.ndarray], tied: Mapping[str, str],
                     target: Mapping[str, Any],
                     flax: matching.FlaxModules) -> tuple[str | None, list[_Rule]]:
  """The first of ``DEFAULT_KEY_MAPS`` whose rules send every key of the source (but tied
  copies and ``num_batches_tracked``) to a leaf or module of the target: ``(its name,
  rules)``; ``(None, [])`` when none does."""
  for model, key_map in DEFAULT_KEY_MAPS.items():
    rules = _compile(key_map)
    covered: list[str] = []
    for key in values:
      if key in tied or key.rpartition(".")[2] == _COUNTER:
        continue
      rule, match = next(((r, m) for r in rules if (m := r.pattern.fullmatch(key))), (None, None))
      if rule is not None and rule.templates is not None and all(
          (path := match.expand(t)) in target or path in flax for t in rule.templates):
        covered.append(key)
      elif _equal_to(values, key, covered) is None:
        break
    else:
      return f"{model.__module__}.{model.__name__}", rules
  return None, []


def _equal_to(values: Mapping[str, np.ndarray], key: str, others) -> str | None:
  """The first of ``others`` whose array equals ``values[key]`` in shape, dtype and bits."""
  value = values[key]
  return next((other for other in others if other != key and values[other].shape == value.shape
               and values[other].dtype == value.dtype and value.ndim >= 2
               and np.array_equal(values[other], value)), None)


def _rule_path(key: str, path: str, rule: _Rule, target: Mapping[str, Any],
               flax: matching.FlaxModules) -> str | None:
  """The Flax leaf a rule sends ``key`` to; None for a module rule's ``num_batches_tracked``."""
  if path in target:
    return path
  leaf = key.rpartition(".")[2]
  if path in flax and (kind := matching.flax_kind(flax[path], target)):
    role = matching.role_path(kind, path, leaf)
    if role in target:
      return role
    if leaf == _COUNTER:
      return None
    raise ValueError(
        f"key_map rule ({rule.pattern.pattern!r}, ...) sends torch key {key!r} to Flax module "
        f"{path!r} ({kind}), which has no leaf for torch leaf {leaf!r}; its leaves: "
        f"{sorted(flax[path].values())}")
  raise ValueError(
      f"key_map rule ({rule.pattern.pattern!r}, ...) maps torch key {key!r} to Flax path "
      f"{path!r}, which the target does not have")


def _infer_layout(key: str, value: np.ndarray, path: str, shape: tuple[int, ...]) -> str:
  """The layout of a tensor whose module class is unknown: from its rank and shape."""
  if not path.endswith("/kernel") or value.ndim < 2:
    return "as_is"
  if value.ndim >= 3:
    return "conv"
  if value.shape[0] == value.shape[1] and len(shape) == 2:
    raise ValueError(
        f"torch key {key!r} is a square {value.shape} weight for Flax path {path!r}, and its "
        f"layout cannot be known from a state_dict: nn.Linear stores (out, in), Hugging Face's "
        f"Conv1D (in, out). Pass the torch module itself instead of its state_dict (layouts "
        f"then come from the module classes), or a key_map rule with a layout, e.g. "
        f"({re.escape(key)!r}, {path!r}, 'linear') or (..., 'as_is')")
  return "as_is" if value.shape == shape else "linear"


def _read_source(source: Any) -> tuple[dict[str, np.ndarray], bool, dict[str, Any]]:
  """``(key -> numpy array, whether the source keeps module order, module name -> torch
  module)``; the last is empty for a state_dict."""
  if hasattr(source, "named_modules") and hasattr(source, "state_dict"):  # A torch.nn.Module.
    values = {key: _to_numpy(value) for key, value in source.state_dict().items()}
    return values, True, dict(source.named_modules())
  if not isinstance(source, Mapping):
    raise TypeError(f"from_state_dict: expected a torch.nn.Module or a state_dict (a mapping "
                    f"key -> tensor or array), got {type(source).__name__}")
  values = {str(key): _to_numpy(value) for key, value in source.items()}
  return values, not isinstance(source, SortedStateDict), {}


def _ties(values: Mapping[str, np.ndarray]) -> dict[str, str]:
  """Key -> the first earlier key whose array is the same memory (a tied weight)."""
  first: dict[tuple, str] = {}
  tied = {}
  for key, value in values.items():
    if value.size:
      memory = (value.ctypes.data, value.shape, value.strides, value.dtype.str)
      if memory in first:
        tied[key] = first[memory]
      else:
        first[memory] = key
  return tied


def _ordered_flat(tree: PyTree) -> dict[str, Any]:
  """``{path: leaf}`` of nested mappings in their own order (``flatten`` sorts dict keys)."""
  if not isinstance(tree, Mapping):
    return flatten(tree)
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update({f"{key}/{path}": leaf for path, leaf in _ordered_flat(value).items()})
    else:
      out[str(key)] = value
  return out


def _with_leaves(tree: PyTree, filled: Mapping[str, np.ndarray], prefix: str = "") -> PyTree:
  """``tree`` with the leaves at ``filled``'s paths replaced, dict order kept."""
  if isinstance(tree, Mapping):
    out = {key: _with_leaves(value, filled, f"{prefix}{key}/") for key, value in tree.items()}
    return flax.core.FrozenDict(out) if isinstance(tree, flax.core.FrozenDict) else out
  path = prefix[:-1]
  if path not in filled:
    return tree
  sharding = getattr(tree, "sharding", None)
  if sharding is not None and len(sharding.device_set) > 1:
    return jax.device_put(filled[path], sharding)
  return jnp.asarray(filled[path])


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


