"""Weight aggregation as tree arithmetic: means, BatchNorm statistics, robust aggregates, soups.

The seed algorithm is the element-wise mean ``W_agg[i] = (1/N) * sum_j W_j[i]`` over N pytrees of
the same structure, shapes and dtypes (whole train states, ``params``, ``batch_stats`` ...)::

  averaged = fjt.aggregate.mean([state_a, state_b, state_c])
  fedavg = fjt.aggregate.aggregate_variables(client_variables, counts=num_examples)

Floating leaves are accumulated in at least float32 (bf16/fp16 upcast, float64 kept) and cast back
to their dtype. Integer and bool leaves (step counters, PRNG keys) are never float-averaged: equal
values pass through and differing ones follow ``integer_policy``: ``"max"`` (right for step
counters), ``"first"`` (input 0) or ``"error"``. Every input is checked against input 0 first, and
errors name the input and the '/'-joined path of the leaf, e.g. ``params/Dense_0/kernel``.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fjt.state import PyTree, model_kwargs
from fjt.tree import key_str, path_str, tree_paths

INTEGER_POLICIES = ("max", "first", "error")
NONFINITE_POLICIES = ("error", "skip")


# ---------------------------------------------------------------------------------------------
# Paths and validation.


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


# ---------------------------------------------------------------------------------------------
# Jitted kernels. Each takes lists of leaves (one list per input), so jax.jit caches one
# compilation per (tree structure, shapes, dtypes); weights and scales are traced arrays.


def _is_floating(dtype: Any) -> bool:
  return jnp.issubdtype(dtype, jnp.floating)


def _is_integer(dtype: Any) -> bool:
  return jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_)


def _acc_dtype(dtype: Any) -> np.dtype:
  """The accumulation dtype: float32 for 16-bit floats and float32, float64 for float64."""
  return jnp.promote_types(dtype, jnp.float32)


def _all_equal(column: Sequence[jax.Array]) -> jax.Array | bool:
  """Element-wise: every input equals input 0."""
  return functools.reduce(jnp.logical_and, [x == column[0] for x in column[1:]], True)


def _integer_leaf(column: Sequence[jax.Array], policy: str) -> tuple[jax.Array, jax.Array]:
  """(combined leaf, whether all inputs are equal) for an integer or bool leaf."""
  out = functools.reduce(jnp.maximum, column) if policy == "max" else jnp.copy(column[0])
  equal = jnp.all(_all_equal(column)) if policy == "error" else jnp.asarray(True)
  return out, equal


def _divide(x: jax.Array, d: jax.Array | float) -> jax.Array:
  """``x / d`` for a scalar ``d``, correctly rounded in every element.

  XLA rewrites ``x / broadcast(d)`` as ``x * (1 / d)``, one ulp off in about half the elements;
  a divisor that depends on ``x`` keeps the true division (it costs no memory traffic). A
  non-finite element of ``x`` gives NaN, which the callers' finiteness checks catch anyway.
  """
  return x / (d + 0 * x)


def _finite_sum(x: jax.Array) -> jax.Array:
  # One cheap reduction of the result, not of the N inputs: any NaN/Inf in an input makes the
  # weighted sum, hence this sum, non-finite (overflow can too; callers then look closer). Rows
  # of partial sums let XLA spread the reduction over threads (about 1.5x faster on CPU): the
  # leading axis of a matrix (a reshape of a leaf sharded on another axis would gather it), or
  # up to 64 rows of a vector.
  if x.ndim >= 2:
    partial = jnp.sum(x, axis=tuple(range(1, x.ndim)), dtype=_acc_dtype(x.dtype))
  else:
    rows = math.gcd(x.size, 64) if x.size else 1
    partial = jnp.sum(x.reshape(rows, -1), axis=1, dtype=_acc_dtype(x.dtype))
  return jnp.all(jnp.isfinite(partial))


def _stack(flags: list[jax.Array]) -> jax.Array:
  return jnp.stack(flags) if flags else jnp.zeros((0,), bool)


@functools.partial(jax.jit, static_argnames=("integer_policy",))
def _mean_leaves(leaves: list[list[jax.Array]], weights: jax.Array, integer_policy: str
                 ) -> tuple[list[jax.Array], jax.Array]:
  """Weighted mean of each leaf and a bool per leaf (floating: sum finite; integer: all equal)."""
  outs, oks = [], []
  for column in zip(*leaves):
    if _is_floating(column[0].dtype):
      acc_dtype = _acc_dtype(column[0].dtype)
      w = weights.astype(acc_dtype)
      # One fused loop per leaf: N reads, one write, accumulation in acc_dtype.
      acc = w[0] * column[0].astype(acc_dtype)
      for j, x in enumerate(column[1:], 1):
        acc = acc + w[j] * x.astype(acc_dtype)
      out = _divide(acc, jnp.sum(w)).astype(column[0].dtype)
      # Rounding can make (x + x + x) / 3 != x: elements equal in every input pass through exactly.
      out = jnp.where(_all_equal(column), column[0], out)
      outs.append(out)
      oks.append(_finite_sum(out))
    else:
      out, equal = _integer_leaf(column, integer_policy)
      outs.append(out)
      oks.append(equal)
  return outs, _stack(oks)


@functools.partial(jax.jit, static_argnames=("trim", "integer_policy"))
def _trimmed_mean_leaves(leaves: list[list[jax.Array]], trim: int, integer_policy: str
                         ) -> tuple[list[jax.Array], jax.Array]:
  """Per coordinate: sort the N values, drop ``trim`` at each end, mean of the rest."""
  outs, oks = [], []
  for column in zip(*leaves):
    if _is_floating(column[0].dtype):
      acc_dtype = _acc_dtype(column[0].dtype)
      ordered = jnp.sort(jnp.stack([x.astype(acc_dtype) for x in column]), axis=0)
      kept = ordered[trim:len(column) - trim]
      out = _divide(jnp.sum(kept, axis=0), kept.shape[0]).astype(column[0].dtype)
      outs.append(out)
      oks.append(_finite_sum(out))  # Inputs are checked before sorting: this catches overflow.
    else:
      out, equal = _integer_leaf(column, integer_policy)
      outs.append(out)
      oks.append(equal)
  return outs, _stack(oks)


@jax.jit
def _task_arithmetic_leaves(base: list[jax.Array], leaves: list[list[jax.Array]], scale: jax.Array
                            ) -> tuple[list[jax.Array], jax.Array]:
  """base + scale * sum_j (W_j - base) per floating leaf; integer leaves are base's."""
  outs, oks = [], []
  for b, column in zip(base, zip(*leaves)):
    if _is_floating(b.dtype):
      acc_dtype = _acc_dtype(b.dtype)
      b_acc = b.astype(acc_dtype)
      delta = functools.reduce(jnp.add, [x.astype(acc_dtype) - b_acc for x in column])
      out = (b_acc + scale.astype(acc_dtype) * delta).astype(b.dtype)
      outs.append(out)
      oks.append(_finite_sum(out))
    else:
      outs.append(jnp.copy(b))
      oks.append(jnp.asarray(True))
  return outs, _stack(oks)


@jax.jit
def _leaf_ok(leaves: list[jax.Array], refs: list[jax.Array | None]) -> jax.Array:
  """Bool per leaf: a floating leaf has no NaN/Inf; another leaf equals its ref (if given)."""
  flags = []
  for x, ref in zip(leaves, refs):
    if _is_floating(x.dtype):
      flags.append(jnp.all(jnp.isfinite(x)))
    else:
      flags.append(jnp.asarray(True) if ref is None else jnp.array_equal(x, ref))
  return _stack(flags)


# ---------------------------------------------------------------------------------------------
# Host-side checks shared by the aggregates.


def _nonfinite_inputs(flats: list[_Flat]) -> dict[int, str]:
  """{input index: path of its first leaf with a NaN or Inf}, from one reduction per input."""
  bad = {}
  for i, flat in enumerate(flats):
    ok = np.asarray(_leaf_ok(flat.leaves, [None] * len(flat.leaves)))
    if not ok.all():
      bad[i] = flat.paths[int(np.argmin(ok))]
  return bad


def _kept_inputs(bad: dict[int, str], names: Sequence[str], on_nonfinite: str,
                 skippable: bool = True) -> list[int]:
  """Indices of the inputs to keep; raises under "error" or when nothing would be left."""
  if not bad:
    return list(range(len(names)))
  first = min(bad)
  if on_nonfinite == "error":
    hint = "; pass on_nonfinite='skip' to leave such inputs out" if skippable else ""
    raise ValueError(f"{names[first]} has a non-finite value (NaN or Inf) at {_at(bad[first])}"
                     + hint)
  if len(bad) == len(names):
    raise ValueError(f"every input has a non-finite value (NaN or Inf), e.g. {names[first]} at "
                     f"{_at(bad[first])}; nothing is left to aggregate")
  warnings.warn("leaving out inputs with non-finite values (NaN or Inf): " + ", ".join(
      f"{names[i]} at {_at(path)}" for i, path in sorted(bad.items())), stacklevel=4)
  return [i for i in range(len(names)) if i not in bad]


def check_finite(trees: Sequence[PyTree], names: Sequence[str] | None = None) -> None:
  """Raises ``ValueError`` naming the first input (``names[i]``, default "input i") with a NaN
  or Inf in a floating leaf, and the leaf's path. For callers that read inputs themselves
  (files, candidates) and must name them as the user knows them."""
  flats, names = _prepare(trees, "max", None, names)
  _kept_inputs(_nonfinite_inputs(flats), names, "error", skippable=False)


def _raise_integer_mismatch(flats: list[_Flat], names: Sequence[str], k: int) -> None:
  ref = np.asarray(flats[0].leaves[k])
  for i, flat in enumerate(flats[1:], 1):
    if not np.array_equal(np.asarray(flat.leaves[k]), ref):
      raise ValueError(
          f"{names[i]} differs from {names[0]} at {_at(flats[0].paths[k])}: values of this "
          f"{ref.dtype} leaf differ and integer_policy='error' (use 'max', e.g. for step "
          "counters, or 'first')")


def _raise_overflow(flats: list[_Flat], out: list[jax.Array], what: str) -> None:
  ok = np.asarray(_leaf_ok(out, [None] * len(out)))
  if not ok.all():
    k = int(np.argmin(ok))
    raise ValueError(f"the {what} of finite inputs overflowed {_acc_dtype(out[k].dtype)} at "
                     f"{_at(flats[0].paths[k])}")


def _check_result(ok: jax.Array, out: list[jax.Array], flats: list[_Flat], names: Sequence[str],
                  what: str) -> dict[int, str]:
  """Reads the kernel's per-leaf flags: returns the inputs with NaN/Inf (empty when all is
  well), raises for an integer mismatch under "error" or a true overflow."""
  ok = np.asarray(ok)  # The one host sync of the fast path.
  if ok.all():
    return {}
  floating = np.array([_is_floating(dtype) for _, dtype in flats[0].specs], bool)
  if (~ok & floating).any():
    bad = _nonfinite_inputs(flats)
    if bad:
      return bad
    _raise_overflow(flats, out, what)  # Else the sum check overflowed, not the result.
  for k in np.flatnonzero(~ok & ~floating):
    _raise_integer_mismatch(flats, names, int(k))
  return {}


def _prepare(trees: Sequence[PyTree], integer_policy: str, on_nonfinite: str | None,
             names: Sequence[str] | None = None) -> tuple[list[_Flat], list[str]]:
  _check_policies(integer_policy, on_nonfinite)
  trees = _as_list(trees)
  names = list(names) if names is not None else _input_names(len(trees))
  return _flatten_all(trees, names), names


# ---------------------------------------------------------------------------------------------
# Means.


def _mean(flats: list[_Flat], names: list[str], weights: np.ndarray, integer_policy: str,
          on_nonfinite: str) -> tuple[PyTree, list[int]]:
  """(weighted mean, indices of the inputs it used)."""
  out, ok = _mean_leaves([f.leaves for f in flats], _weights_array(weights), integer_policy)
  bad = _check_result(ok, out, flats, names, "weighted mean")
  if bad:
    kept = _kept_inputs(bad, names, on_nonfinite)
    if weights[kept].sum() <= 0:
      raise ValueError("every input with a positive weight has a non-finite value (NaN or Inf)")
    result, used = _mean([flats[i] for i in kept], [names[i] for i in kept], weights[kept],
                         integer_policy, on_nonfinite)
    return result, [kept[i] for i in used]
  return flats[0].treedef.unflatten(out), list(range(len(flats)))


def mean(trees: Sequence[PyTree], weights: Sequence[float] | None = None,
         integer_policy: str = "max", on_nonfinite: str = "error") -> PyTree:
  """Element-wise weighted mean of N pytrees: ``sum_j w_j * W_j / sum_j w_j`` per leaf.

  Args:
    trees: N pytrees with the same structure, shapes and dtypes (checked; see
      ``check_compatible``). Leaves are arrays: floating, integer or bool.
    weights: N finite non-negative numbers with a positive sum (e.g. example counts for FedAvg);
      None for the plain mean ``(1/N) * sum_j W_j``. Only their ratios matter.
    integer_policy: for integer/bool leaves that differ between inputs: ``"max"`` (element-wise),
      ``"first"`` (input 0's) or ``"error"``. Equal values always pass through.
    on_nonfinite: an input with a NaN or Inf in a floating leaf raises (``"error"``, naming the
      input and path) or is left out with a warning (``"skip"``).

  Returns:
    A tree like ``trees[0]`` with the input dtypes. Floating leaves are accumulated in float32
    (bf16/fp16 upcast, float64 kept) in one jit-compiled pass (one fused loop per leaf), then cast
    back; elements equal in all inputs are returned bit-exactly.
  """
  flats, names = _prepare(trees, integer_policy, on_nonfinite)
  return _mean(flats, names, _check_weights(weights, len(flats)), integer_policy, on_nonfinite)[0]


def uniform_soup(trees: Sequence[PyTree], integer_policy: str = "max") -> PyTree:
  """The uniform model soup: ``mean(trees)`` of fine-tuned models sharing one initialization."""
  return mean(trees, integer_policy=integer_policy)


class RunningMean:
  """Streaming weighted mean: trees are added one at a time; memory is one accumulator.

  For N checkpoints that do not fit in memory together::

    acc = RunningMean()
    for path in checkpoint_paths:
      acc.add(restore(path), weight=1.0)
    averaged = acc.result()

  The accumulator holds floating leaves in float32 (float64 for float64 leaves) plus the total
  weight; each ``add`` is one jit-compiled ``acc += w * W`` with the accumulator's buffers donated.
  ``result()`` equals ``mean`` of the same inputs up to float32 rounding. Integer leaves follow
  ``integer_policy`` as in ``mean``; NaN/Inf in an added tree follows ``on_nonfinite``.
  """

  def __init__(self, integer_policy: str = "max", on_nonfinite: str = "error"):
    _check_policies(integer_policy, on_nonfinite)
    self._integer_policy = integer_policy
    self._on_nonfinite = on_nonfinite
    self._ref: _Flat | None = None  # Shapes and dtypes of the first tree accumulated.
    self._ref_name = ""
    self._acc: list[jax.Array] | None = None
    self._seen = 0  # Inputs offered, for names in messages; skipped ones included.
    self._count = 0
    self._total = 0.0

  @property
  def count(self) -> int:
    """The number of trees accumulated (skipped ones not counted)."""
    return self._count

  @property
  def total_weight(self) -> float:
    """The sum of the weights of the trees accumulated."""
    return self._total

  def add(self, tree: PyTree, weight: float = 1.0) -> None:
    """Adds ``weight * tree`` (``weight`` finite and >= 0); ``tree`` must match the first tree
    added in structure, shapes and dtypes."""
    name = f"input {self._seen}"
    self._seen += 1
    try:
      weight = float(weight)
    except (TypeError, ValueError) as e:
      raise TypeError(f"weight of {name} must be a number, got {weight!r}") from e
    if not np.isfinite(weight) or weight < 0:
      raise ValueError(f"weight of {name} is {weight}; weights must be finite and non-negative")
    if self._ref is None:
      flat = _flatten_all([tree], [name])[0]
      refs = [None] * len(flat.leaves)
    else:
      flat = _check_against(self._ref, tree, self._ref_name, name)
      check_equal = self._integer_policy == "error"
      refs = [a if check_equal and not _is_floating(a.dtype) else None for a in self._acc]
    ok = np.asarray(_leaf_ok(flat.leaves, refs))
    if not ok.all():
      k = int(np.argmin(ok))
      if not _is_floating(flat.specs[k][1]):
        raise ValueError(f"{name} differs from {self._ref_name} at {_at(flat.paths[k])}: values "
                         f"of this {flat.specs[k][1]} leaf differ and integer_policy='error'")
      message = f"{name} has a non-finite value (NaN or Inf) at {_at(flat.paths[k])}"
      if self._on_nonfinite == "error":
        raise ValueError(message + "; pass on_nonfinite='skip' to leave such inputs out")
      warnings.warn(f"leaving out {message}", stacklevel=2)
      return
    w = jnp.asarray(weight, jax.dtypes.canonicalize_dtype(jnp.float64))
    if self._acc is None:
      self._ref, self._ref_name = flat.without_arrays(), name
      self._acc = _start_accumulator(flat.leaves, w)
    else:
      self._acc = _accumulate(self._acc, flat.leaves, w, self._integer_policy)
    self._count += 1
    self._total += weight

  def result(self, consume: bool = False) -> PyTree:
    """The weighted mean of the trees added so far, with the first tree's dtypes.

    With ``consume``, the result takes over the accumulator's memory (float32 and float64 leaves
    are divided in place), so the end of a stream holds one model, not two; the RunningMean is
    then empty, as if new.
    """
    if self._acc is None:
      raise ValueError("RunningMean.result(): no tree has been added")
    if self._total <= 0:
      raise ValueError("RunningMean.result(): the added weights sum to 0")
    dtypes = tuple(dtype for _, dtype in self._ref.specs)
    total = jnp.asarray(self._total, jax.dtypes.canonicalize_dtype(jnp.float64))
    treedef = self._ref.treedef
    if not consume:
      return treedef.unflatten(_finish_accumulator(self._acc, total, dtypes))
    acc, self._acc, self._ref, self._count, self._total = self._acc, None, None, 0, 0.0
    with warnings.catch_warnings():
      # bf16/fp16 leaves are accumulated in float32: their buffers cannot hold the result.
      warnings.filterwarnings("ignore", "Some donated buffers were not usable")
      return treedef.unflatten(_finish_accumulator_in_place(acc, total, dtypes))


@jax.jit
def _start_accumulator(leaves: list[jax.Array], weight: jax.Array) -> list[jax.Array]:
  # jnp.copy: the accumulator is donated later, so it must never be the caller's buffer.
  return [weight.astype(_acc_dtype(x.dtype)) * x.astype(_acc_dtype(x.dtype))
          if _is_floating(x.dtype) else jnp.copy(x) for x in leaves]


@functools.partial(jax.jit, static_argnames=("integer_policy",), donate_argnums=0)
def _accumulate(acc: list[jax.Array], leaves: list[jax.Array], weight: jax.Array,
                integer_policy: str) -> list[jax.Array]:
  out = []
  for a, x in zip(acc, leaves):
    if _is_floating(x.dtype):
      out.append(a + weight.astype(a.dtype) * x.astype(a.dtype))
    else:
      out.append(jnp.maximum(a, x) if integer_policy == "max" else a)
  return out


def _finish(acc: list[jax.Array], total: jax.Array, dtypes: tuple[np.dtype, ...]
            ) -> list[jax.Array]:
  return [_divide(a, total.astype(a.dtype)).astype(dtype) if _is_floating(dtype) else jnp.copy(a)
          for a, dtype in zip(acc, dtypes)]


_finish_accumulator = jax.jit(_finish, static_argnames=("dtypes",))
_finish_accumulator_in_place = jax.jit(_finish, static_argnames=("dtypes",), donate_argnums=0)


# ---------------------------------------------------------------------------------------------
# BatchNorm statistics.


def _batch_norm_pairs(paths: Sequence[str], dtypes: Sequence[np.dtype], prefix: str = ""
                      ) -> dict[str, tuple[int, int]]:
  """{module path: (leaf index of mean, leaf index of var)}; raises naming a malformed module."""
  join = lambda p: f"{prefix}/{p}" if prefix and p else (prefix or p)
  modules: dict[str, dict[str, int]] = {}
  for k, path in enumerate(paths):
    parent, _, name = path.rpartition("/")
    if name not in ("mean", "var"):
      raise ValueError(f"{_at(join(path))} is not a BatchNorm statistic: batch_stats leaves are "
                       "named 'mean' and 'var', one pair per BatchNorm module")
    if not _is_floating(dtypes[k]):
      raise TypeError(f"{_at(join(path))} has dtype {dtypes[k]}; BatchNorm statistics are floating")
    modules.setdefault(parent, {})[name] = k
  for parent, pair in modules.items():
    if len(pair) != 2:
      (has,) = pair
      lacks = "var" if has == "mean" else "mean"
      raise ValueError(f"BatchNorm module {_at(join(parent))} has '{has}' but no '{lacks}'")
  return {parent: (pair["mean"], pair["var"]) for parent, pair in modules.items()}


@functools.partial(jax.jit, static_argnames=("pairs",))
def _pooled_stats(leaves: list[list[jax.Array]], counts: jax.Array,
                  pairs: tuple[tuple[int, int], ...]) -> list[jax.Array]:
  out = list(leaves[0])
  for mean_k, var_k in pairs:
    dtype = leaves[0][mean_k].dtype
    acc_dtype = _acc_dtype(dtype)
    n = counts.astype(acc_dtype)
    means = [leaf[mean_k].astype(acc_dtype) for leaf in leaves]
    variances = [leaf[var_k].astype(acc_dtype) for leaf in leaves]
    total = jnp.sum(n)
    pooled_mean = _divide(functools.reduce(jnp.add, [n[j] * m for j, m in enumerate(means)]), total)
    pooled_var = _divide(functools.reduce(jnp.add, [
        n[j] * (v + jnp.square(m - pooled_mean)) for j, (m, v) in enumerate(zip(means, variances))
    ]), total)
    out[mean_k] = pooled_mean.astype(dtype)
    out[var_k] = pooled_var.astype(leaves[0][var_k].dtype)
  return out


def merge_batch_stats(stats: Sequence[PyTree], counts: Sequence[float]) -> PyTree:
  """BatchNorm statistics of N replicas merged into those of the union of their data.

  Each ``stats[j]`` is a ``batch_stats`` collection: under each BatchNorm module a dict with
  ``mean`` and ``var`` (float32 ``(features,)``), the mean and population (ddof=0) variance of
  ``counts[j]`` examples, as flax's BatchNorm keeps them. Per module, with ``n = sum_j n_j``::

    mean = sum_j n_j * mean_j / n,   var = sum_j n_j * (var_j + (mean_j - mean)^2) / n

  i.e. the law of total variance; a plain mean of the variances would miss the between-replica
  term. ``counts`` are non-negative with a positive sum (only their ratios matter).
  """
  stats = _as_list(stats, "stats")
  names = _input_names(len(stats))
  flats = _flatten_all(stats, names)
  counts = _check_weights(counts, len(stats), "counts")
  pairs = _batch_norm_pairs(flats[0].paths, [dtype for _, dtype in flats[0].specs])
  out = _pooled_stats([f.leaves for f in flats], _weights_array(counts),
                      pairs=tuple(pairs.values()))
  return flats[0].treedef.unflatten(out)


_MOMENTS = "fjt_batch_norm_moments"


def _record_batch_norm_moments(next_fun, args, kwargs, context):
  """Method interceptor: sows the mean, population variance and count of each training-mode
  BatchNorm's input, reduced over every axis but the feature axes, as the module would."""
  module = context.module
  if isinstance(module, nn.BatchNorm) and context.method_name == "__call__":
    x = args[0]
    use_running_average = nn.merge_param(
        "use_running_average", module.use_running_average,
        kwargs.get("use_running_average", args[1] if len(args) > 1 else None))
    if not use_running_average:
      if kwargs.get("mask") is not None:
        raise ValueError(f"BatchNorm {'/'.join(module.path)} is called with a mask; "
                         "recompute_batch_stats does not support masked statistics")
      feature_axes = {a % x.ndim for a in np.atleast_1d(module.axis)}
      axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
      x = x.astype(_acc_dtype(x.dtype))
      mu = jnp.mean(x, axes)
      # Two passes (not E[x^2] - E[x]^2): exact statistics are the point here.
      var = jnp.mean(jnp.square(x - jnp.expand_dims(mu, axes)), axes)
      count = int(np.prod([x.shape[a] for a in axes]))
      module.sow(_MOMENTS, "moments", (mu, var, jnp.asarray(count, jnp.int32)))
  return next_fun(*args, **kwargs)


@functools.partial(jax.jit, static_argnums=0)
def _batch_moments(model: nn.Module, variables: PyTree, x: jax.Array) -> PyTree:
  with nn.intercept_methods(_record_batch_norm_moments):
    _, updates = model.apply(variables, x, **model_kwargs(model, train=True),
                             mutable=["batch_stats", _MOMENTS],
                             rngs={"dropout": jax.random.PRNGKey(0)})
  return updates.get(_MOMENTS, {})


def recompute_batch_stats(model: nn.Module, variables: Mapping[str, PyTree],
                          batches: Iterable[jax.Array | Mapping[str, jax.Array]]
                          ) -> dict[str, PyTree]:
  """``variables`` with every BatchNorm's statistics re-estimated over all of ``batches``.

  Needed after averaging diverged weights: the averaged running statistics do not describe the
  averaged network's activations. Each batch (an input array ``x``, or a dict holding ``"x"``)
  goes through ``model.apply(variables, x, train=True)``; a method interceptor records each
  BatchNorm's input mean and population variance over the reduced axes (batch, and height and
  width for convolutions), and the per-batch moments are pooled with the exact formula of
  ``merge_batch_stats``, weighted by the number of values reduced. So the result is the mean and
  variance (ddof=0) of the BatchNorm inputs over the concatenated data, independent of momentum
  (the training-time running average is an EMA). As in PyTorch's ``update_bn``, later layers see
  activations normalized with per-batch statistics (train mode); with all data in one batch every
  layer's statistics are those of the whole data. BatchNorms used in eval mode keep theirs.
  """
  if "batch_stats" not in variables:
    raise ValueError(f"variables has collections {sorted(variables)}; recompute_batch_stats "
                     "needs 'batch_stats'")
  flat = _Flat(variables["batch_stats"])
  pairs = _batch_norm_pairs(flat.paths, [dtype for _, dtype in flat.specs], "batch_stats")
  pooled: dict[str, tuple[dict[str, jax.Array], int]] = {}
  seen_batches = 0
  for batch in batches:
    x = batch["x"] if isinstance(batch, Mapping) else batch
    moments = _batch_moments(model, variables, x)
    seen_batches += 1
    for keypath, sown in jax.tree_util.tree_flatten_with_path(
        moments, is_leaf=lambda node: isinstance(node, tuple))[0]:
      module = path_str(keypath[:-1])  # Drop the sow name: the rest is the module's path.
      for mu, var, count in sown:
        stats, n = {"mean": mu, "var": var}, int(count)
        if module in pooled:
          previous, n_before = pooled[module]
          stats, n = merge_batch_stats([previous, stats], [n_before, n]), n_before + n
        pooled[module] = stats, n
  if not seen_batches:
    raise ValueError("batches is empty; recompute_batch_stats needs at least one batch")
  leaves = list(flat.leaves)
  for module, (mean_k, var_k) in pairs.items():
    if module in pooled:
      leaves[mean_k] = pooled[module][0]["mean"].astype(flat.specs[mean_k][1])
      leaves[var_k] = pooled[module][0]["var"].astype(flat.specs[var_k][1])
  return {**variables, "batch_stats": flat.treedef.unflatten(leaves)}


def aggregate_variables(variables_list: Sequence[Mapping[str, PyTree]], counts: Sequence[float],
                        integer_policy: str = "max", on_nonfinite: str = "error"
                        ) -> dict[str, PyTree]:
  """FedAvg of N models' variables: ``params`` by the mean weighted by ``counts``, ``batch_stats``
  by ``merge_batch_stats`` (exact pooled statistics of the union of the replicas' data).

  ``variables_list[j]`` is ``{"params": ..., "batch_stats": ...}`` as ``model.init`` returns it
  (``batch_stats`` optional); ``counts[j]`` is the number of examples replica j trained on.
  """
  variables_list = _as_list(variables_list, "variables_list")
  _, names = _prepare(variables_list, integer_policy, on_nonfinite)
  collections = list(variables_list[0].keys()) if isinstance(variables_list[0], Mapping) else None
  if collections is None or not set(collections) <= {"params", "batch_stats"} or \
      "params" not in collections:
    raise ValueError(f"input 0 has collections {collections}; aggregate_variables takes "
                     "{'params', 'batch_stats'} (use mean() for other trees)")
  counts = _check_weights(counts, len(variables_list), "counts")
  stats = [{"batch_stats": v.get("batch_stats", {})} for v in variables_list]
  stats_flats = [_Flat(s) for s in stats]
  # Validated here, with paths from the variables' root, before any arithmetic.
  _batch_norm_pairs(stats_flats[0].paths, [d for _, d in stats_flats[0].specs])
  kept = _kept_inputs(_nonfinite_inputs(stats_flats), names, on_nonfinite)
  params, used = _mean([_Flat({"params": variables_list[i]["params"]}) for i in kept],
                       [names[i] for i in kept], counts[kept], integer_policy, on_nonfinite)
  used = [kept[i] for i in used]
  result = {"params": params["params"]}
  if "batch_stats" in collections:
    batch_stats = [variables_list[i]["batch_stats"] for i in used]
    result["batch_stats"] = (merge_batch_stats(batch_stats, counts[used])
                             if jax.tree.leaves(batch_stats[0]) else batch_stats[0])
  return result


# ---------------------------------------------------------------------------------------------
# Robust aggregates.


def _trimmed(flats: list[_Flat], names: list[str], trim_of: Callable[[int], int],
             integer_policy: str, on_nonfinite: str) -> PyTree:
  kept = _kept_inputs(_nonfinite_inputs(flats), names, on_nonfinite)
  flats, names = [flats[i] for i in kept], [names[i] for i in kept]
  out, ok = _trimmed_mean_leaves([f.leaves for f in flats], trim_of(len(flats)), integer_policy)
  _check_result(ok, out, flats, names, "trimmed mean")
  return flats[0].treedef.unflatten(out)


def median(trees: Sequence[PyTree], integer_policy: str = "max",
           on_nonfinite: str = "error") -> PyTree:
  """Coordinate-wise median of N pytrees; for even N the mean of the two middle values.

  Sorts the N values of each coordinate in float32 (float64 for float64 leaves) and casts back;
  memory is N times the largest leaf. Validation, integer leaves and NaN/Inf handling as ``mean``.
  """
  flats, names = _prepare(trees, integer_policy, on_nonfinite)
  return _trimmed(flats, names, lambda n: (n - 1) // 2, integer_policy, on_nonfinite)


def trimmed_mean(trees: Sequence[PyTree], trim: float | int, integer_policy: str = "max",
                 on_nonfinite: str = "error") -> PyTree:
  """Coordinate-wise trimmed mean: per coordinate, sort the N values, drop k at each end, and
  average the remaining N - 2k in float32 (float64 for float64 leaves).

  ``trim`` is a fraction in [0, 0.5), giving ``k = floor(trim * N)``, or an int count k with
  ``2k < N``. ``trim=0`` is the plain mean; the largest k is the median. Validation, integer
  leaves and NaN/Inf handling as ``mean`` (N counts the inputs left after skipping).
  """
  flats, names = _prepare(trees, integer_policy, on_nonfinite)
  if isinstance(trim, (bool, np.bool_)) or not isinstance(trim, (int, float, np.integer,
                                                                  np.floating)):
    raise TypeError(f"trim must be a fraction in [0, 0.5) or an int count, got {trim!r}")
  if isinstance(trim, (int, np.integer)):
    trim_of = lambda n: int(trim)
    if trim < 0:
      raise ValueError(f"trim is {trim}; a count must be >= 0")
  else:
    trim_of = lambda n: int(np.floor(trim * n))
    if not 0 <= trim < 0.5:
      raise ValueError(f"trim is {trim}; a fraction must be in [0, 0.5)")

  def checked(n: int) -> int:
    k = trim_of(n)
    if 2 * k >= n:
      raise ValueError(f"trim drops {k} values at each end of {n}; nothing would be left")
    return k

  return _trimmed(flats, names, checked, integer_policy, on_nonfinite)


# ---------------------------------------------------------------------------------------------
# Model soups and task arithmetic.


def greedy_soup(candidates: Sequence[PyTree], evaluate: Callable[[PyTree], float],
                integer_policy: str = "max") -> tuple[PyTree, list[int], list[dict[str, Any]]]:
  """Greedy model soup (Wortsman et al., 2022): ``evaluate(tree) -> float``, higher is better.

  Candidates are ranked by their own score; the soup starts as the best one, and each next
  candidate is kept if the uniform mean of the kept ones plus it scores at least as well.

  Returns:
    ``(soup, chosen, log)``: the soup (a tree like the candidates), the indices of the candidates
    in it (in the order added), and one dict per candidate in rank order with ``candidate``,
    ``score`` (its own), ``soup_score`` (of the soup tried with it) and ``kept``.
  """
  candidates = _as_list(candidates, "candidates")
  _prepare(candidates, integer_policy, None)  # A mismatch fails before any evaluation.
  check_finite(candidates, [f"candidate {i}" for i in range(len(candidates))])  # Not "input 1" of a trial.

  def score_of(tree: PyTree, what: str) -> float:
    score = float(evaluate(tree))
    if not np.isfinite(score):
      raise ValueError(f"evaluate returned {score} for {what}; scores must be finite")
    return score

  scores = [score_of(c, f"candidate {i}") for i, c in enumerate(candidates)]
  ranked = sorted(range(len(candidates)), key=lambda i: -scores[i])
  chosen, best = [ranked[0]], scores[ranked[0]]
  soup = mean([candidates[ranked[0]]], integer_policy=integer_policy)
  log = [{"candidate": ranked[0], "score": best, "soup_score": best, "kept": True}]
  for i in ranked[1:]:
    trial = mean([candidates[j] for j in chosen + [i]], integer_policy=integer_policy)
    trial_score = score_of(trial, f"the soup of candidates {chosen + [i]}")
    kept = trial_score >= best
    log.append({"candidate": i, "score": scores[i], "soup_score": trial_score, "kept": kept})
    if kept:
      soup, best = trial, trial_score
      chosen.append(i)
  return soup, chosen, log


def task_arithmetic(base: PyTree, trees: Sequence[PyTree], scale: float = 1.0) -> PyTree:
  """Adds scaled task vectors to a base model: ``base + scale * sum_j (W_j - base)`` per leaf.

  Floating leaves are computed in float32 (float64 for float64) and cast to the base's dtype;
  integer leaves are the base's. A NaN/Inf in any input raises, naming it (``base`` or
  ``tree j``) and the path.
  """
  trees = _as_list(trees)
  names = ["base"] + [f"tree {j}" for j in range(len(trees))]
  flats = _flatten_all([base] + trees, names)
  scale = float(scale)
  if not np.isfinite(scale):
    raise ValueError(f"scale is {scale}; it must be finite")
  out, ok = _task_arithmetic_leaves(flats[0].leaves, [f.leaves for f in flats[1:]],
                                    jnp.asarray(scale, jax.dtypes.canonicalize_dtype(jnp.float64)))
  _kept_inputs(_check_result(ok, out, flats, names, "task arithmetic"), names, "error",
               skippable=False)
  return flats[0].treedef.unflatten(out)


__all__ = [
    "INTEGER_POLICIES", "NONFINITE_POLICIES", "RunningMean", "aggregate_variables",
    "check_compatible", "greedy_soup", "mean", "median", "merge_batch_stats",
    "recompute_batch_stats", "task_arithmetic", "tree_paths", "trimmed_mean", "uniform_soup",
]
