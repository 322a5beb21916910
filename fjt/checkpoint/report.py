"""PyTorch-style key reports: how a checkpoint's tree differs from a target's, computed from
shapes and dtypes alone (``missing_keys``, ``unexpected_keys``, plus mismatched shapes)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from fjt.tree import flatten, to_nested_dict

PyTree = Any


@dataclasses.dataclass(frozen=True)
class LoadReport:
  """How a checkpoint's tree differs from a target's, by '/'-joined path.

  Attributes:
    missing: in the target, not in the checkpoint (they keep the target's value).
    unexpected: in the checkpoint, not in the target (not read).
    mismatched: in both, with a different shape or dtype (see ``details``).
    skipped: target paths matching a ``skip`` pattern (not read; target's value kept).
    details: path -> "checkpoint SHAPE DTYPE, target SHAPE DTYPE" for mismatched paths.
    loaded: target paths given the checkpoint's value (not compared by ``==``).
  """
  missing: list[str]
  unexpected: list[str]
  mismatched: list[str]
  skipped: list[str] = dataclasses.field(default_factory=list)
  details: dict[str, str] = dataclasses.field(default_factory=dict)
  loaded: list[str] = dataclasses.field(default_factory=list, compare=False)

  def counts(self) -> str:
    """One line: how many of the target's leaves were filled, skipped and left missing."""
    total = len(self.loaded) + len(set(self.missing) | set(self.skipped))
    missing = [p for p in self.missing if p not in self.skipped]
    few = f" ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})" if missing else ""
    return (f"{len(self.loaded)} of {total} leaves loaded, {len(self.skipped)} skipped, "
            f"{len(missing)} missing{few}, {len(self.unexpected)} of the checkpoint's unused")

  def __str__(self) -> str:
    lines = [f"missing ({len(self.missing)}): " + ", ".join(self.missing),
             f"unexpected ({len(self.unexpected)}): " + ", ".join(self.unexpected),
             f"mismatched ({len(self.mismatched)}): " +
             ", ".join(f"{p} [{self.details[p]}]" for p in self.mismatched)]
    if self.skipped:
      lines.append(f"skipped ({len(self.skipped)}): " + ", ".join(self.skipped))
    return "\n".join(lines)


def shape_dtype(leaf) -> tuple[tuple[int, ...], np.dtype]:
  """``(shape, numpy dtype)`` of an array, ``ShapeDtypeStruct`` or Python scalar."""
  if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
    leaf = np.asarray(leaf)
  return tuple(leaf.shape), np.dtype(leaf.dtype)


def _describe(shape, dtype) -> str:
  return f"{tuple(shape)} {np.dtype(dtype).name}"


def compare(saved: dict[str, jax.ShapeDtypeStruct], target: PyTree,
            skip: Sequence[str] = ()) -> LoadReport:
  """The report of loading a checkpoint with leaves ``saved`` into ``target``."""
  target_flat = flatten(to_nested_dict(target))
  missing = [p for p in target_flat if p not in saved]
  unexpected = [p for p in saved if p not in target_flat]
  mismatched, details = [], {}
  for p, leaf in target_flat.items():
    if p in saved:
      shape, dtype = shape_dtype(leaf)
      if (tuple(saved[p].shape), np.dtype(saved[p].dtype)) != (shape, dtype):
        mismatched.append(p)
        details[p] = (f"checkpoint {_describe(saved[p].shape, saved[p].dtype)}, "
                      f"target {_describe(shape, dtype)}")
  skipped = [p for p in target_flat if any(re.search(s, p) for s in skip)]
  loaded = [p for p in target_flat if p in saved and p not in skipped]
  return LoadReport(missing, unexpected, mismatched, skipped, details, loaded)


def nesting_hint(saved: Sequence[str], target: Sequence[str]) -> str:
  """Why no path of ``saved`` is one of ``target``, when one is the other under a prefix:
  e.g. ``params/params/Dense_0/kernel`` holds ``params/Dense_0/kernel`` under ``params/``."""
  for outer, inner, where in ((saved, target, "the checkpoint nests the target's paths one "
                               "level deeper, under"),
                              (target, saved, "the target nests the checkpoint's paths under")):
    inner_set = set(inner)
    for path in outer:
      parts = path.split("/")
      for i in range(1, len(parts)):
        for j in range(i):  # Without the levels j .. i-1: params/params/x -> params/x.
          if "/".join(parts[:j] + parts[i:]) in inner_set:
            return f"{where} {'/'.join(parts[j:i]) + '/'!r}"
  return ""
