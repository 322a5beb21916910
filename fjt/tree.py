"""Pytree paths: every leaf named by its '/'-joined path, e.g. ``params/Dense_0/kernel``."""

from __future__ import annotations

from typing import Any

import flax.serialization
import jax
from flax.core import meta

PyTree = Any


def key_str(key) -> str:
  """One step of a jax key path as text: a dict key, a sequence index or an attribute name."""
  if isinstance(key, (jax.tree_util.DictKey, jax.tree_util.FlattenedIndexKey)):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  return str(key)


def path_str(keypath) -> str:
  return "/".join(key_str(k) for k in keypath)


def tree_paths(tree: PyTree) -> list[str]:
  """The '/'-joined path of every leaf, in ``jax.tree.leaves`` order.

  Dict keys by name, sequence items by index, dataclass fields by attribute
  name: ``params/Dense_0/kernel`` in a ``TrainState``, ``opt_state/0/mu/...`` in an
  optax state; a bare array (the whole tree one leaf) has path ``""``.
  """
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def flatten(tree: PyTree) -> dict[str, Any]:
  """``{path: leaf}`` in ``jax.tree.leaves`` order (empty subtrees have no entry)."""
  return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  """Nested dicts from ``{path: leaf}``; the inverse of ``flatten`` on nested dicts."""
  nested: dict[str, Any] = {}
  for path, leaf in flat.items():
    node = nested
    *parents, name = path.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[name] = leaf
  return nested


def to_nested_dict(tree: PyTree) -> PyTree:
  """A train state, optax state or variables as plain nested dicts of arrays.

  Dataclasses and named tuples become dicts of their fields, tuples dicts keyed
  '0', '1', ... (``flax.serialization.to_state_dict``), so the paths of a saved
  state read ``opt_state/1/0/trace/Dense_0/kernel``.
  """
  return flax.serialization.to_state_dict(tree)


def unbox(tree: PyTree) -> PyTree:
  """``tree`` with Flax's metadata boxes (``nn.LogicallyPartitioned``, ``nn.Partitioned``: what
  ``model.init`` returns for parameters with logical axis names) replaced by their arrays,
  keeping the key order of dicts (``jax.tree.map`` would sort them; interop matches by the
  definition order)."""
  if isinstance(tree, dict):
    return {k: unbox(v) for k, v in tree.items()}
  return meta.unbox(tree)
