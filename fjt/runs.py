"""A workdir holds one run: the config it was made with, and a lock while a process uses it.

``config.json`` is the record of the config a workdir's checkpoints were made with. Running
again into that workdir (``check_rerun``) compares the new config with the record before any
work: a key that changes what is trained (model, data, optimizer, seed, ...) is refused with one
line naming each key with its old and new value; a key that does not (``RESULT_NEUTRAL``:
logging, evaluation, checkpoint cadence and retention, timeouts, the device mesh) is allowed; a larger
``train.steps`` continues the run. ``move_aside`` renames a workdir so a run can start over in
place (``scripts/train.py --restart``); nothing is deleted. ``WorkdirLock`` keeps a second run off
a workdir that a live process is using; the kernel drops the lock of a killed process.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from fjt.config import RUN_DEFAULTS, ConfigError
from fjt.logs import say

RECORD = "config.json"
LOCK = ".fjt-lock"

# Keys (or groups, ending in ".") whose value does not change the trained state or its eval
# metrics: a rerun may change them freely. The mesh and the sharding rules only lay the same
# state out differently (a run resumes on another mesh, to float reordering).
RESULT_NEUTRAL = ("train.log_every", "train.eval_every", "train.eval_batch_size", "checkpoint.",
                  "distributed.", "mesh.", "sharding_rules")


class WorkdirInUseError(ConfigError):
  """Another live process holds the workdir's lock."""


class RunConfigChangedError(ConfigError):
  """A rerun's config differs from the workdir's record in a key that changes the result."""


@dataclasses.dataclass(frozen=True)
class Change:
  """One key whose value differs between a workdir's record (``old``) and a new config."""
  key: str
  old: Any
  new: Any

  def __str__(self) -> str:
    show = lambda v: "(absent)" if v is _ABSENT else json.dumps(v)
    return f"{self.key} {show(self.old)} -> {show(self.new)}"


_ABSENT = object()


def _flat(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping) and value:
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def as_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``config`` as ``config.json`` holds it (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def config_changes(old: Mapping, new: Mapping) -> list[Change]:
  """Every dotted key whose value differs between two config records, sorted by key."""
  a, b = _flat(old), _flat(new)
  return [Change(k, a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in sorted(set(a) | set(b))
          if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def result_neutral(key: str) -> bool:
  """Whether a key's value leaves the trained state and its metrics unchanged."""
  return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESULT_NEUTRAL)


def read_record(workdir: str) -> dict[str, Any] | None:
  """The config recorded in ``workdir``, or None if it has none (a new workdir)."""
  path = os.path.join(workdir, RECORD)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path}: cannot read the config this run was made with ({e}); move the "
                      "workdir aside or use a new --workdir") from e


def check_rerun(workdir: str, config: ml_collections.ConfigDict,
                has_results: bool) -> list[Change]:
  """Compares ``config`` with the record of the run in ``workdir``; returns the changes that
  are allowed (result-neutral keys, a larger ``train.steps``).

  Only a workdir with results (``has_results``: checkpoints or a final state) is protected: a
  run killed before its first save made nothing that a new config could contradict. Raises
  ``RunConfigChangedError`` naming every other changed key with both values, before anything
  is written.
  """
  record = read_record(workdir)
  if record is None or not has_results:
    return []
  changes = [c for c in config_changes(record, as_record(config)) if not _new_default(c)]
  refused = [c for c in changes if not result_neutral(c.key)
             and not (c.key == "train.steps" and _raised(c))]
  if refused:
    raise RunConfigChangedError(
        f"workdir {workdir} holds a run made with a different config: "
        + "; ".join(map(str, refused)) + ". Use a new --workdir, or --restart to move this run "
        f"aside (to {aside_name(workdir)}) and start over in place")
  return changes


def _new_default(change: Change) -> bool:
  """A key the record lacks (written before fjt had it) set to its ``RUN_DEFAULTS`` value: the
  run was made with that behaviour, so it is no change."""
  defaults = _flat(json.loads(json.dumps(RUN_DEFAULTS)))
  return change.old is _ABSENT and change.key in defaults and change.new == defaults[change.key]


def _raised(change: Change) -> bool:
  return isinstance(change.old, int) and isinstance(change.new, int) and change.new > change.old


def aside_name(workdir: str) -> str:
  """The first free ``WORKDIR.previous-N`` (N = 1, 2, ...)."""
  base, n = os.path.abspath(workdir).rstrip(os.sep), 1
  while os.path.exists(f"{base}.previous-{n}"):
    n += 1
  return f"{base}.previous-{n}"


def move_aside(workdir: str) -> str | None:
  """Renames ``workdir`` to ``aside_name(workdir)`` (its lock held meanwhile) and returns the
  new name; None if there is nothing to move. Nothing is deleted."""
  if not os.path.isdir(workdir) or not os.listdir(workdir):
    return None
  with WorkdirLock(workdir):
    aside = aside_name(workdir)
    os.rename(workdir, aside)
  return aside


def restart(workdir: str) -> str | None:
  """Starts the run in ``workdir`` over: process 0 moves the old run aside (``move_aside``)
  and says where, then every process of the run goes on together. Returns the new name."""
  import jax
  aside = move_aside(workdir) if jax.process_index() == 0 else None
  if aside:
    say(f"moved the previous run in {workdir} to {aside}; starting over")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("fjt.runs.restart")
  return aside


class WorkdirLock:
  """An exclusive ``flock`` on ``WORKDIR/.fjt-lock`` for as long as a run uses the workdir.

  A second run on the workdir is refused at once (``WorkdirInUseError`` naming the holder's
  pid). The kernel releases the lock when its process ends, however it ends, so a lock left by
  a killed run never blocks the next one. ``enabled=False`` (the other processes of a
  multi-process run: process 0 holds it for all) makes it a no-op.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.path, self.enabled, self._fd = os.path.join(workdir, LOCK), enabled, None

  def acquire(self) -> WorkdirLock:
    if not self.enabled:
      return self
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
      os.close(fd)
      raise WorkdirInUseError(
          f"workdir {os.path.dirname(self.path)} is in use by another run (pid {holder}); wait "
          "for it to finish or use another --workdir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
