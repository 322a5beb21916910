"""Non-finite inputs and the checks of a kernel's result: NaN/Inf named by input and path,
inputs skipped under ``on_nonfinite="skip"``, integer mismatches, overflow."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import jax
import numpy as np

from fjt.aggregate.checks import (_acc_dtype, _as_list, _at, _check_policies, _Flat, _flatten_all,
                                  _input_names, _is_floating)
from fjt.aggregate.leaves import _leaf_ok
from fjt.state import PyTree

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

