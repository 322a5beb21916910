"""Structure, shape and dtype checks of N input trees, with errors naming the input and path.

Also the policies shared by every rule (integer leaves, non-finite inputs), the validation of
weights and the accumulation dtype: float32 for 16-bit floats and float32, float64 for float64.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fjt.state import PyTree
from fjt.tree import key_str, path_str, tree_paths

INTEGER_POLICIES = ("max", "first", "error")
NONFINITE_POLICIES = ("error", "skip")


def _at(path: str) -> str:
  return path or "(the root)"


def _spec(x: Any) -> tuple[tuple[int, ...], np.dtype]:
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return tuple(x.shape), x.dtype
  return tuple(np.shape(x)), np.dtype(jnp.result_type(x))  # Python scalars.


def _children(node: Any) -> tuple[Any, list[tuple[Any, Any]]]:
  """(kind of ``node``, [(key, child)] one level down); a leaf has no children."""
  pairs, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
  if len(pairs) == 1 and pairs[0][0] == ():
    return "a leaf", []
  return type(node).__name__, [(p[0], c) for p, c in pairs]


def _first_node_difference(a: Any, b: Any, path: tuple = ()) -> tuple[str, str, str] | None:
  """(path, what ``a`` has, what ``b`` has) at the first container that differs, else None."""
  if jax.tree.structure(a) == jax.tree.structure(b):
    return None
  kind_a, kids_a = _children(a)
  kind_b, kids_b = _children(b)
  keys_a, keys_b = [key_str(k) for k, _ in kids_a], [key_str(k) for k, _ in kids_b]
  if kind_a != kind_b or keys_a != keys_b:
    return (path_str(path), f"{kind_a} with keys {keys_a}" if kids_a else kind_a,
            f"{kind_b} with keys {keys_b}" if kids_b else kind_b)
  for (key, child_a), (_, child_b) in zip(kids_a, kids_b):
    found = _first_node_difference(child_a, child_b, path + (key,))
    if found:
      return found
  # Same types and keys all the way down, but e.g. different dataclass aux data.
  return path_str(path), str(jax.tree.structure(a)), str(jax.tree.structure(b))


class _Flat:
  """One input flattened: its treedef, leaves, (shape, dtype) of each leaf and leaf paths."""

  def __init__(self, tree: PyTree):
    self.tree = tree
    self.leaves, self.treedef = jax.tree.flatten(tree)
    self.specs = [_spec(x) for x in self.leaves]

  @functools.cached_property
  def paths(self) -> list[str]:
    # Lazily: rendering thousands of paths per input costs more than the checks that rarely
    # need them.
    return tree_paths(self.tree)

  def without_arrays(self) -> _Flat:
    """The same description holding no arrays (a tree of ShapeDtypeStructs), to keep as a
    reference without keeping its memory alive."""
    structs = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in self.specs]
    flat = _Flat(self.treedef.unflatten(structs))
    flat.leaves = []
    return flat


def _check_against(ref: _Flat, tree: PyTree, ref_name: str, name: str) -> _Flat:
  """Flattens ``tree`` and raises ValueError at the first difference from ``ref``."""
  flat = _Flat(tree)
  if flat.treedef != ref.treedef:
    for paths, others, where in ((ref.paths, flat.paths, f"in {ref_name} but missing from {name}"),
                                 (flat.paths, ref.paths, f"in {name} but not in {ref_name}")):
      others = set(others)
      only = [p for p in paths if p not in others]
      if only:
        more = f" (and {len(only) - 1} more paths)" if len(only) > 1 else ""
        raise ValueError(f"{name} differs from {ref_name} in structure: {_at(only[0])} is "
                         f"{where}{more}")
    path, ref_has, has = _first_node_difference(ref.tree, tree)
    raise ValueError(f"{name} differs from {ref_name} in structure at {_at(path)}: {has} in "
                     f"{name}, {ref_has} in {ref_name}")
  if flat.specs == ref.specs:
    return flat
  for path, (shape, dtype), (ref_shape, ref_dtype) in zip(flat.paths, flat.specs, ref.specs):
    if shape != ref_shape:
      raise ValueError(f"{name} differs from {ref_name} at {_at(path)}: shape {shape} in {name}, "
                       f"{ref_shape} in {ref_name}")
    if dtype != ref_dtype:
      raise ValueError(f"{name} differs from {ref_name} at {_at(path)}: dtype {dtype} in {name}, "
                       f"{ref_dtype} in {ref_name}")
  return flat


def _as_list(trees: Sequence[PyTree], what: str = "trees") -> list[PyTree]:
  if isinstance(trees, Mapping) or hasattr(trees, "shape") or not isinstance(trees, Iterable):
    raise TypeError(f"{what} must be a sequence of pytrees (one per input), got a "
                    f"{type(trees).__name__}; wrap a single tree in a list")
  trees = list(trees)
  if not trees:
    raise ValueError(f"{what} is empty; at least one tree is needed")
  return trees


def _input_names(n: int) -> list[str]:
  return [f"input {i}" for i in range(n)]


def _flatten_all(trees: list[PyTree], names: Sequence[str]) -> list[_Flat]:
  """Flattens every input, checking each against input 0; also rejects unsupported dtypes."""
  ref = _Flat(trees[0])
  for k, (_, dtype) in enumerate(ref.specs):
    if not (_is_floating(dtype) or _is_integer(dtype)):
      raise TypeError(f"{names[0]} at {_at(ref.paths[k])}: dtype {dtype} cannot be aggregated "
                      "(floating, integer and bool leaves can)")
  return [ref] + [_check_against(ref, t, names[0], names[i]) for i, t in enumerate(trees[1:], 1)]


def check_compatible(trees: Sequence[PyTree], names: Sequence[str] | None = None) -> None:
  """Raises ValueError unless all ``trees`` have input 0's tree structure, shapes and dtypes.

  The message names the first input that differs, the path of the first difference and what each
  side has, e.g. ``input 2 differs from input 0 at params/Dense_0/kernel: shape (64, 16) in input
  2, (64, 32) in input 0``; for a structure difference, the path missing from (or extra in) it.
  ``names`` replaces ``"input i"`` in messages (e.g. file names of checkpoints). Leaves may be
  arrays or ``jax.ShapeDtypeStruct``s, so abstract trees (``jax.eval_shape``) can be checked too.
  """
  trees = _as_list(trees)
  names = list(names) if names is not None else _input_names(len(trees))
  if len(names) != len(trees):
    raise ValueError(f"names has {len(names)} entries for {len(trees)} trees")
  ref = _Flat(trees[0])
  for i, tree in enumerate(trees[1:], 1):
    _check_against(ref, tree, names[0], names[i])


def _check_policies(integer_policy: str, on_nonfinite: str | None = None) -> None:
  if integer_policy not in INTEGER_POLICIES:
    raise ValueError(f"integer_policy is {integer_policy!r}; expected one of {INTEGER_POLICIES}")
  if on_nonfinite is not None and on_nonfinite not in NONFINITE_POLICIES:
    raise ValueError(f"on_nonfinite is {on_nonfinite!r}; expected one of {NONFINITE_POLICIES}")


def _check_weights(weights: Sequence[float] | None, n: int, what: str = "weights") -> np.ndarray:
  """float64 ``(n,)``: finite, non-negative, positive sum (ones when ``weights`` is None)."""
  if weights is None:
    return np.ones(n)
  try:
    w = np.asarray(weights, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise TypeError(f"{what} must be {n} numbers, got {weights!r}") from e
  if w.shape != (n,):
    raise ValueError(f"{what} has shape {w.shape}; expected ({n},), one per input")
  for i, value in enumerate(w):
    if not np.isfinite(value) or value < 0:
      raise ValueError(f"{what}[{i}] is {value}; {what} must be finite and non-negative")
  if w.sum() <= 0:
    raise ValueError(f"{what} sum to 0; at least one must be positive")
  return w


def _weights_array(w: np.ndarray) -> jax.Array:
  # Scaling by a power of two is exact and keeps sum_j w_j x_j in range for huge counts.
  exponent = np.frexp(w.max())[1]
  return jnp.asarray(np.ldexp(w, -exponent), jax.dtypes.canonicalize_dtype(jnp.float64))


def _is_floating(dtype: Any) -> bool:
  return jnp.issubdtype(dtype, jnp.floating)


def _is_integer(dtype: Any) -> bool:
  return jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_)


def _acc_dtype(dtype: Any) -> np.dtype:
  """The accumulation dtype: float32 for 16-bit floats and float32, float64 for float64."""
  return jnp.promote_types(dtype, jnp.float32)

