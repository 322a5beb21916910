"""Orbax checkpoints: save and load any pytree, with PyTorch-style key reports.

``save(path, tree)`` is ``torch.save(model.state_dict(), path)``;
``load(path, target, strict=False)`` is ``load_state_dict(strict=False)``, but the
key differences are computed from Orbax metadata before any array is read, and
a shape mismatch is always an error unless the path is explicitly skipped.
Every restore checks the checkpoint's manifest (``fjt.checkpoint.integrity.verify_or_say``).
"""

from __future__ import annotations

import ctypes
import os
import shutil
from collections.abc import Iterator, Sequence
from typing import Any

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from fjt.checkpoint import integrity
from fjt.checkpoint.errors import CheckpointError, CheckpointMismatchError
from fjt.checkpoint.report import LoadReport, compare, nesting_hint, shape_dtype
from fjt.tree import flatten, path_str, to_nested_dict, unflatten

PyTree = Any
ITEM = "default"  # The item name a single-item CheckpointManager gives the tree.
VARIABLES = ("params", "batch_stats")  # The collections of a model's variables.


# --- Locating checkpoints ---------------------------------------------------------------------


def step_dirs(checkpoints_dir: str) -> list[tuple[int, str]]:
  """``[(step, directory)]`` of the finished steps under ``checkpoints_dir``, oldest first.

  Unfinished saves (``<step>.orbax-checkpoint-tmp*``) and renamed steps are not listed.
  """
  if not os.path.isdir(checkpoints_dir):
    return []
  steps = [(int(name), os.path.join(checkpoints_dir, name)) for name in os.listdir(checkpoints_dir)
           if name.isdigit() and os.path.isdir(os.path.join(checkpoints_dir, name))]
  return sorted(steps)


def resolve(path: str | os.PathLike) -> tuple[str, str]:
  """``(checkpoint_dir, item_dir)`` for a run workdir (its newest step), its
  ``checkpoints/`` directory, one step directory, or a directory made by ``save``.

  ``checkpoint_dir`` holds the manifest, ``item_dir`` Orbax's ``_METADATA``.
  """
  path = os.path.abspath(os.fspath(path))  # Orbax takes absolute paths only.
  if not os.path.isdir(path):
    if os.path.isdir(path + ".fjt-old"):
      raise CheckpointError(f"no checkpoint at {path!r}: a save replacing it was killed; the "
                            f"previous checkpoint is {path + '.fjt-old'!r} (rename it back)")
    raise CheckpointError(f"no checkpoint at {path!r}: it is not a directory")
  if os.path.isfile(os.path.join(path, "_METADATA")):
    return path, path
  if os.path.isdir(os.path.join(path, ITEM)):
    return path, os.path.join(path, ITEM)
  items = _items(path)
  if len(items) == 1:  # A CheckpointManager step of one composite item, e.g. 300/state.
    return path, os.path.join(path, items[0])
  if len(items) > 1:
    raise CheckpointError(f"checkpoint {path!r} holds the items {items}; name one, e.g. "
                          f"{os.path.join(path, items[0])!r}")
  checkpoints = os.path.join(path, "checkpoints")
  steps = step_dirs(checkpoints if os.path.isdir(checkpoints) else path)
  if steps:
    return resolve(steps[-1][1])
  raise CheckpointError(
      f"no checkpoint at {path!r}: expected a run workdir, its checkpoints/ directory, a step "
      "directory or a directory written by fjt.checkpoint.save")


def _items(step_dir: str) -> list[str]:
  """The Orbax items of a ``CheckpointManager`` step (sub-directories with a ``_METADATA``)."""
  return sorted(name for name in os.listdir(step_dir)
                if os.path.isfile(os.path.join(step_dir, name, "_METADATA")))


# --- Metadata -----------------------------------------------------------------------------------


def _tree_metadata(item_dir: str) -> PyTree:
  # The handler, not a Checkpointer: it reads the item alone, without step metadata.
  handler = ocp.PyTreeCheckpointHandler()
  try:
    return handler.metadata(epath.Path(item_dir)).tree
  finally:
    handler.close()


def saved_mesh(path: str | os.PathLike) -> dict[str, int] | None:
  """``{axis: size}`` of the mesh a run's checkpoint was saved from (its manifest), or None
  if it does not say (saved by ``save``, or by an older fjt)."""
  checkpoint_dir, _ = resolve(path)
  return integrity.manifest_mesh(checkpoint_dir)


def saved_shapes(path: str | os.PathLike) -> dict[str, jax.ShapeDtypeStruct]:
  """``{path: ShapeDtypeStruct}`` of a checkpoint, from metadata only: the manifest's list of
  arrays, or Orbax's metadata for checkpoints without one."""
  checkpoint_dir, item_dir = resolve(path)
  shapes = integrity.manifest_shapes(checkpoint_dir)
  if shapes is not None:
    return shapes
  try:
    tree = _tree_metadata(item_dir)
  except Exception as e:  # Orbax raises several types for unreadable metadata.
    raise CheckpointError(f"checkpoint {checkpoint_dir}: metadata cannot be read: {e}") from e
  return {p: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)) for p, m in flatten(tree).items()}


# --- Save and load ------------------------------------------------------------------------------


def _handler() -> ocp.PyTreeCheckpointHandler:
  # Zarr3 and uncompressed, like torch.save: zstd makes normally distributed float32 weights
  # only 7% smaller and made saving and restoring a 256 MB train state about 2x slower (bench).
  # Checkpoints written by earlier versions (zarr2, compressed) read the same.
  return ocp.PyTreeCheckpointHandler(use_zarr3=True, use_compression=False)


_RENAME_EXCHANGE = 2  # renameat2 flag (Linux >= 3.15): swap two paths atomically.
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
  """Swaps the directories ``a`` and ``b`` in one atomic step; False where the OS or the file
  system cannot (then nothing changed)."""
  try:
    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
  except (AttributeError, OSError):
    return False
  return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _is_saved_checkpoint(path: str) -> bool:
  return any(os.path.isfile(os.path.join(path, name)) for name in ("_METADATA", integrity.MANIFEST))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes(name)


def save(path: str | os.PathLike, tree: PyTree, force: bool = True) -> None:
  """Saves any pytree of arrays (e.g. params alone) to the directory ``path``, like
  ``torch.save``: an existing checkpoint there is replaced atomically.

  The new checkpoint is written and given its manifest in ``PATH.fjt-tmp``, then swapped
  with the old one in one rename, so a process killed at any moment leaves ``path`` holding
  the old checkpoint or the new one, whole. Blocks until it is complete on disk.

  Args:
    force: with ``False``, an existing ``path`` is an error instead. A ``path`` that exists
      but is not a checkpoint written by ``save`` is never replaced.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path):
    if not _is_saved_checkpoint(path):
      raise FileExistsError(f"checkpoint.save: {path} exists and is not a checkpoint written by "
                            "fjt.checkpoint.save; choose a new path")
    if not force:
      raise FileExistsError(f"checkpoint.save: {path} exists and is a checkpoint; pass force=True "
                            "to replace it")
  tmp = path + ".fjt-tmp"
  main = jax.process_index() == 0  # One writer per checkpoint in a multi-process run.
  if main:
    for leftover in [tmp] + [p for p in _siblings(tmp) if ".orbax-checkpoint-tmp" in p]:
      shutil.rmtree(leftover, ignore_errors=True)  # Of a save that was killed.
  _sync("fjt-save-clean")
  with ocp.Checkpointer(_handler()) as checkpointer:
    checkpointer.save(tmp, args=ocp.args.PyTreeSave(to_nested_dict(tree)))
  if main:
    integrity.write_manifest(tmp, integrity.array_specs(tree))
    if not os.path.exists(path):
      os.rename(tmp, path)
    elif _exchange(tmp, path):
      shutil.rmtree(tmp)  # The old checkpoint, swapped out.
    else:  # No atomic swap here: between the renames, the old one is at PATH.fjt-old.
      old = path + ".fjt-old"
      shutil.rmtree(old, ignore_errors=True)
      os.rename(path, old)
      os.rename(tmp, path)
      shutil.rmtree(old)
  _sync("fjt-save-done")


def _siblings(path: str) -> list[str]:
  """Paths in ``path``'s directory whose name starts with its name."""
  parent, name = os.path.split(path)
  if not os.path.isdir(parent):
    return []
  return [os.path.join(parent, n) for n in os.listdir(parent) if n.startswith(name)]


def _sharding(leaf) -> jax.sharding.Sharding:
  sharding = getattr(leaf, "sharding", None)
  return sharding if sharding is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _restore(checkpoint_dir: str, item_dir: str, abstract: dict[str, jax.ShapeDtypeStruct],
             item: PyTree | None = None) -> dict:
  """Reads the leaves ``abstract`` (``{path: ShapeDtypeStruct with sharding}``) as jax arrays;
  ``item``: the same leaves in the saved tree's own structure (lists stay lists), if known."""
  item = unflatten(abstract) if item is None else item
  try:
    handler = ocp.PyTreeCheckpointHandler()
    try:
      restored = handler.restore(epath.Path(item_dir), args=ocp.args.PyTreeRestore(
          item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True))
    finally:
      handler.close()
  except Exception as e:  # Orbax and TensorStore raise many types; name the checkpoint.
    raise CheckpointError(f"checkpoint {checkpoint_dir} cannot be read: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:500]}") from e
  return flatten(restored)


def load(path: str | os.PathLike, target: PyTree | None = None, strict: bool = True,
         skip: Sequence[str] = ()):
  """Loads a checkpoint, optionally onto ``target``.

  Args:
    path: a run workdir (its newest step), its ``checkpoints/`` directory, one
      step directory, or a directory written by ``save``.
    target: ``None``, or a pytree (e.g. a ``TrainState`` or ``{"params": ...}``)
      of arrays or ``jax.ShapeDtypeStruct``. Restored leaves take the target's
      dtype and sharding, whatever mesh the checkpoint was saved from (each device
      reads only its shards): a state saved on data=2 x fsdp=4 loads onto fsdp=8,
      data=8 or one device. The result has the target's type. Onto variables
      (``{"params", "batch_stats"}`` or one of them), a run's checkpoint gives
      those sub-trees: its optimizer state, step and rng are not "unexpected".
    strict: with a target, raise ``CheckpointMismatchError`` listing every
      missing, unexpected and mismatched path (outside ``skip``).
    skip: regular expressions (``re.search``) on '/'-joined target paths not to
      load; those keep the target's value even if their shape differs.

  Returns:
    Without a target, the saved tree as nested dicts of arrays (lists where the saved
    tree had them, e.g. another program's optax state). With a target and
    ``strict=True``, the restored tree. With ``strict=False``, ``(tree, report)``:
    paths in both are loaded, missing ones keep the target's values;
    ``report.counts()`` is one line of how many were loaded, skipped and missing.

  The checkpoint's CRC-32s are checked before the read; a damaged file raises
  ``CheckpointError`` naming it, and nothing is read from it.

  Raises:
    CheckpointMismatchError: also with ``strict=False``, a load that fills none of the
      target's ``params`` leaves: one line with a few paths of each side, and the prefix when one tree nests the other's
      paths one level deeper (``params/params/...``).

  ``path`` may also be a plain Orbax ``CheckpointManager`` directory or step (its one item,
  standard or composite, e.g. ``300/state``), holding e.g. a flax ``TrainState``.
  """
  checkpoint_dir, item_dir = resolve(path)
  integrity.verify_or_say(checkpoint_dir)
  return _load(checkpoint_dir, item_dir, target, strict, skip)


def _load(checkpoint_dir: str, item_dir: str, target: PyTree | None, strict: bool,
          skip: Sequence[str]):
  saved = saved_shapes(checkpoint_dir)
  if target is None:
    abstract = {p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=_sharding(None))
                for p, s in saved.items()}
    tree = _tree_metadata(item_dir)  # Another program's tree may hold lists (optax states).
    item = jax.tree_util.tree_map_with_path(lambda kp, _: abstract[path_str(kp)], tree)
    restored = _restore(checkpoint_dir, item_dir, abstract, item)
    return jax.tree_util.tree_map_with_path(lambda kp, _: restored[path_str(kp)], tree)

  return _fill(checkpoint_dir, _onto(saved, target), target, strict, skip,
               lambda abstract: _restore(checkpoint_dir, item_dir, abstract))


def load_tree(source: PyTree, target: PyTree, strict: bool = True, skip: Sequence[str] = (),
              name: str = "the source tree"):
  """``load`` from a tree in memory (e.g. ``fjt.interop.hf.from_pretrained``'s variables)
  instead of a checkpoint: the same report, the same rules (shapes must agree outside
  ``skip``; a load that fills none of the target's params is an error) and the same result:
  leaves in the target's dtypes and shardings. ``name`` names the source in errors."""
  flat = flatten(to_nested_dict(source))
  saved = {p: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype if not hasattr(v, "dtype")
                                   else v.dtype) for p, v in flat.items()}
  read = lambda abstract: {p: jax.device_put(np.asarray(flat[p]).astype(a.dtype), a.sharding)
                           for p, a in abstract.items()}
  return _fill(name, _onto(saved, target), target, strict, skip, read)


def _fill(checkpoint_dir: str, saved: dict[str, jax.ShapeDtypeStruct], target: PyTree,
          strict: bool, skip: Sequence[str], read):
  """``target`` with the leaves ``read({path: ShapeDtypeStruct with sharding})`` gives for the
  paths of ``saved`` it also has (see ``load``); ``checkpoint_dir`` names the source."""
  report = compare(saved, target, skip)
  skipped = set(report.skipped)
  if strict:
    bad = [p for p in report.missing + report.unexpected + report.mismatched if p not in skipped]
    if bad:
      raise CheckpointMismatchError(
          f"checkpoint {checkpoint_dir} does not match the target at {len(bad)} paths:\n{report}", report)
  _check_fills_some(checkpoint_dir, saved, report)
  nested_target = to_nested_dict(target)
  target_flat = flatten(nested_target)
  shape_bad = [p for p in report.mismatched if p not in skipped
               and tuple(saved[p].shape) != shape_dtype(target_flat[p])[0]]
  if shape_bad:
    raise CheckpointMismatchError(
        f"checkpoint {checkpoint_dir}: shapes differ at " +
        "; ".join(f"{p} ({report.details[p]})" for p in shape_bad) +
        ". Pass skip=[pattern] to keep the target's value for these paths", report)

  to_read = [p for p in target_flat if p in saved and p not in skipped]
  abstract = {}
  for p in to_read:
    shape, dtype = shape_dtype(target_flat[p])
    abstract[p] = jax.ShapeDtypeStruct(shape, dtype, sharding=_sharding(target_flat[p]))
  restored = read(abstract) if abstract else {}
  for p in target_flat:
    if p not in restored and isinstance(target_flat[p], jax.ShapeDtypeStruct):
      raise CheckpointMismatchError(
          f"checkpoint {checkpoint_dir} has no value for {p}, and the target gives only its shape; "
          "pass a target with arrays to keep their values", report)
  merged = jax.tree_util.tree_map_with_path(
      lambda kp, leaf: restored.get(path_str(kp), leaf), nested_target)
  tree = flax.serialization.from_state_dict(target, merged)
  return tree if strict else (tree, report)


def _check_fills_some(checkpoint_dir: str, saved: dict[str, Any], report: LoadReport) -> None:
  """A load that would fill none of the target's ``params`` leaves is an error: one line with
  a few paths of each side."""
  target = report.loaded + [p for p in report.missing if p not in report.loaded]
  wanted = [p for p in target if p.startswith("params/")]
  if not wanted or set(wanted) & set(report.loaded) or set(wanted) <= set(report.skipped):
    return
  few = lambda paths: ", ".join(list(paths)[:3]) + (", ..." if len(paths) > 3 else "")
  hint = nesting_hint(list(saved), wanted)
  raise CheckpointMismatchError(
      f"checkpoint {checkpoint_dir} fills none of the target's {len(wanted)} leaves: it has "
      f"{few(list(saved))} where the target has {few(wanted)}" + (f"; {hint}" if hint else ""),
      report)


def _onto(saved: dict[str, jax.ShapeDtypeStruct], target: PyTree) -> dict[str, jax.ShapeDtypeStruct]:
  """The leaves of ``saved`` that loading onto ``target`` considers: for a variables target
  (top-level keys among ``VARIABLES``), only the checkpoint's ``VARIABLES`` sub-trees."""
  nested = to_nested_dict(target)
  if not (isinstance(nested, dict) and nested and set(nested) <= set(VARIABLES)):
    return saved
  return {p: s for p, s in saved.items() if p.split("/", 1)[0] in VARIABLES} or saved


def _variables_paths(saved: dict[str, Any]) -> dict[str, str]:
  """``{variables path: saved path}``: ``params/...`` and ``batch_stats/...`` leaves as they are,
  or, for a params tree saved on its own, every leaf under ``params/``."""
  names = {p: p for p in saved if p.startswith(("params/", "batch_stats/"))}
  return names or {f"params/{p}" if p else "params": p for p in saved}


def variables_shapes(path: str | os.PathLike) -> dict[str, jax.ShapeDtypeStruct]:
  """``{path: ShapeDtypeStruct}`` of the leaves ``load_variables`` reads, from metadata only."""
  saved = saved_shapes(path)
  return {name: saved[p] for name, p in _variables_paths(saved).items()}


def iter_variables(path: str | os.PathLike, groups: Sequence[Sequence[str]] | None = None
                   ) -> Iterator[dict[str, jax.Array]]:
  """Reads the variables of a checkpoint one group of leaves at a time.

  ``groups`` are lists of paths as ``variables_shapes`` names them (default: all of them, one
  group); yields ``{path: array}`` per group, in order, reading each group only when asked. So
  code streaming over many checkpoints holds one group, not one model, of each input.
  """
  checkpoint_dir, item_dir = resolve(path)

  def read(group: Sequence[str]) -> dict[str, jax.Array]:
    unknown = [p for p in group if p not in names]
    if unknown:
      raise CheckpointError(f"checkpoint {checkpoint_dir} has no variable {unknown[0]}; it has: "
                            + ", ".join(names))
    abstract = {names[p]: jax.ShapeDtypeStruct(saved[names[p]].shape, saved[names[p]].dtype,
                                               sharding=_sharding(None)) for p in group}
    restored = _restore(checkpoint_dir, item_dir, abstract) if abstract else {}
    return {p: restored[names[p]] for p in group}

  integrity.verify_or_say(checkpoint_dir)  # The whole checkpoint, before the first group.
  saved = saved_shapes(checkpoint_dir)
  names = _variables_paths(saved)
  groups = [list(names)] if groups is None else list(groups)
  first = read(groups[0]) if groups else None
  for i, group in enumerate(groups):
    yield first if i == 0 else read(group)


def load_variables(path: str | os.PathLike) -> dict[str, PyTree]:
  """``{"params", "batch_stats"}`` of a checkpoint, reading nothing else.

  The checkpoint may hold a whole train state (its optimizer state is not read),
  variables, or a params tree on its own (then ``batch_stats`` is ``{}``).
  """
  variables = unflatten(next(iter_variables(path)))
  return {"params": variables.get("params", {}), "batch_stats": variables.get("batch_stats", {})}
