"""A workdir holds one run: the config it was made with, and a lock while a process uses it.

``config.json`` is the record of the config a workdir's checkpoints were made with. Running
again into that workdir (``check_rerun``) compares the new config with the record before any
work: a key that changes what is trained (model, data, optimizer, seed, ...) is refused with one
line naming each key with its old and new value; a key that does not (``RESULT_NEUTRAL``:
logging, evaluation, checkpoint cadence and retention, timeouts, the device mesh) is allowed; a larger
``train.steps`` continues the run. ``move_aside`` renames a workdir so a run can start over in
place (``scripts/train.py --restart``); nothing is deleted. ``WorkdirLock`` keeps a second run off
a workdir that a live process is using; the kernel drops the lock of a killed process.

This module is the one reader of ``config.json``: ``read_record`` (a workdir's) and
``find_record`` (the run around a checkpoint). ``run_config``, ``load_model`` and
``run_vocabulary`` give back a run's config, model and variables, and vocabulary.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import ml_collections

from fjt.config import RUN_DEFAULTS, ConfigError
from fjt.logs import say

if TYPE_CHECKING:
  import flax.linen as nn

RECORD = "config.json"
LOCK = ".fjt-lock"

# Keys (or groups, ending in ".") whose value does not change the trained state or its eval
# metrics: a rerun may change them freely. The mesh and the sharding rules only lay the same
# state out differently (a run resumes on another mesh, to float reordering).
RESULT_NEUTRAL = ("train.log_every", "train.eval_every", "train.eval_batch_size", "checkpoint.",
                  "distributed.", "mesh.", "sharding_rules", "allow_changed_data")
DATA_KEY = "data_fingerprint"  # config.json's entry for the data (fjt.data.fingerprint).


class WorkdirInUseError(ConfigError):
  """Another live process holds the workdir's lock."""


class RunConfigChangedError(ConfigError):
  """A rerun's config differs from the workdir's record in a key that changes the result."""


class DataChangedError(ConfigError):
  """The data a run was trained on changed since (``fjt.data.fingerprint``)."""


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


def checkpoint_record(workdir: str) -> tuple[str, dict[str, Any]] | None:
  """``(step directory, record)`` of the newest checkpoint of ``workdir`` whose manifest holds
  the run's record (``fjt.checkpoint.RunCheckpointer``: config, data fingerprint), or None."""
  from fjt.checkpoint import integrity, step_dirs
  for _, directory in reversed(step_dirs(os.path.join(workdir, "checkpoints"))):
    record = integrity.manifest_record(directory)
    if record is not None and isinstance(record.get("config"), dict):
      return directory, record
  return None


def _read_saved(workdir: str) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
  """``(config, data fingerprint or None)`` recorded in ``workdir``, or None (a new workdir).

  A ``config.json`` that is missing or cannot be read while the workdir has checkpoints is
  recovered from the newest checkpoint's own record of the config, said in one line."""
  path = os.path.join(workdir, RECORD)
  error = None
  if os.path.isfile(path):
    try:
      with open(path, encoding="utf-8") as f:
        record = json.load(f)
      return record, record.pop(DATA_KEY, None)
    except (OSError, ValueError) as e:
      error = e
  saved = checkpoint_record(workdir) if os.path.isdir(os.path.join(workdir, "checkpoints")) else None
  if saved is not None:
    say(f"{path} is {'unreadable (' + str(error) + ')' if error else 'missing'}; using the "
        f"config recorded in checkpoint {saved[0]}")
    return saved[1]["config"], saved[1].get("data")
  if error is not None:
    raise ConfigError(f"{path}: cannot read the config this run was made with ({error}) and no "
                      "checkpoint records it; move the workdir aside or use a new --workdir"
                      ) from error
  return None


def read_record(workdir: str) -> dict[str, Any] | None:
  """The config recorded in ``workdir``, or None if it has none (a new workdir); see
  ``_read_saved`` for a lost ``config.json``."""
  saved = _read_saved(workdir)
  return None if saved is None else saved[0]


def record_file(config: ml_collections.ConfigDict, fingerprint: Mapping[str, Any] | None) -> str:
  """The text of ``config.json``: the config and the fingerprint of its data."""
  return json.dumps({**as_record(config), DATA_KEY: dict(fingerprint or {})}, indent=2)


def check_data(where: str, recorded: Mapping[str, Any] | None, now: Mapping[str, Any],
               allow: bool) -> None:
  """Raises ``DataChangedError`` (one line naming each change) if the data's fingerprint ``now``
  differs from the one ``recorded`` for the run in ``where``, unless ``allow`` (then says so).
  A run recorded without a fingerprint (older fjt, a loader of your own) is not compared."""
  from fjt.data.fingerprint import changes
  found = changes(recorded, now) if recorded else []
  if not found:
    return
  if allow:
    say(f"the data of the run in {where} changed since it was made ({'; '.join(found)}); "
        "going on as allow_changed_data says")
    return
  raise DataChangedError(
      f"the data of the run in {where} changed since it was made: {'; '.join(found)}. Restore "
      "the data, or pass --config.allow_changed_data=true to use it anyway")


def _find_saved(path: str | os.PathLike) -> tuple[str, dict, dict | None] | None:
  """``(workdir, config, fingerprint)`` of the run around ``path`` (see ``find_record``)."""
  path = os.path.abspath(os.fspath(path))
  for _ in range(4):  # workdir/checkpoints/<step>/default at most.
    saved = _read_saved(path)
    if saved is not None:
      return (path, *saved)
    path = os.path.dirname(path)
  return None


def find_record(path: str | os.PathLike) -> dict[str, Any] | None:
  """The config recorded by the run that wrote the checkpoint at ``path`` (a run workdir, its
  ``checkpoints/``, a step directory or its item): the ``config.json`` in ``path`` or in the 3
  directories above it; None if there is none."""
  saved = _find_saved(path)
  return None if saved is None else saved[1]


def check_run_data(source: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
  """``check_data`` for a tool reading a run (``sample.py``, ``embeddings.py``): the data of
  ``config.data`` against the fingerprint the run around ``source`` recorded."""
  from fjt.data.fingerprint import data_fingerprint
  saved = None if is_config_path(source) else _find_saved(source)
  if saved is not None and saved[2]:
    check_data(saved[0], saved[2], data_fingerprint(config.data),
               bool(config.get("allow_changed_data", False)))


def check_rerun(workdir: str, config: ml_collections.ConfigDict,
                has_results: bool, fingerprint: Mapping[str, Any] | None = None) -> list[Change]:
  """Compares ``config`` with the record of the run in ``workdir``; returns the changes that
  are allowed (result-neutral keys, a larger ``train.steps``).

  Only a workdir with results (``has_results``: checkpoints or a final state) is protected: a
  run killed before its first save made nothing that a new config could contradict. Raises
  ``RunConfigChangedError`` naming every other changed key with both values, before anything
  is written.
  """
  saved = _read_saved(workdir)
  if saved is None or not has_results:
    return []
  record = saved[0]
  changes = [c for c in config_changes(record, as_record(config)) if not _new_default(c)]
  refused = [c for c in changes if not result_neutral(c.key)
             and not (c.key == "train.steps" and _raised(c))]
  if refused:
    raise RunConfigChangedError(
        f"workdir {workdir} holds a run made with a different config: "
        + "; ".join(map(str, refused)) + ". Use a new --workdir, or --restart to move this run "
        f"aside (to {aside_name(workdir)}) and start over in place")
  if fingerprint is not None:
    check_data(workdir, saved[1], fingerprint, bool(config.get("allow_changed_data", False)))
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


def check_output(path: str | os.PathLike, overwrite: bool = False) -> None:
  """Refuses to write a tool's output (``scripts/convert.py``) at ``path`` where something
  exists, unless ``overwrite``; and always into a run: its workdir or anything under its
  ``checkpoints/`` (a training state that a resume reads). One ``ConfigError`` line each."""
  path = os.path.abspath(os.fspath(path))
  above = path
  for _ in range(4):  # workdir/checkpoints/<step>/default at most.
    if os.path.isfile(os.path.join(above, RECORD)) or os.path.isdir(
        os.path.join(above, "checkpoints")):
      rel = os.path.relpath(path, above)
      if rel == "." or rel.split(os.sep)[0] == "checkpoints":
        raise ConfigError(f"{path} is {'the run' if rel == '.' else 'inside the checkpoints of the run'}"
                          f" in {above}: its checkpoints are a training state that resuming reads; "
                          "write the output elsewhere")
    above = os.path.dirname(above)
  if os.path.exists(path) and not overwrite:
    raise ConfigError(f"{path} exists; pass --overwrite to replace it")


# --- A run read back: its config, model and vocabulary ------------------------------------------


def is_config_path(source: Any) -> bool:
  """Whether ``source`` names a config file (``*.py``) rather than a run or a checkpoint."""
  return isinstance(source, (str, os.PathLike)) and os.fspath(source).endswith(".py")


def _tuples(value):
  """JSON lists back to the tuples a config file writes (``features=(256, 256)``)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def run_config(source: str | os.PathLike) -> ml_collections.ConfigDict:
  """The config of a config file, or of the run that wrote the checkpoint at ``source`` (a run
  workdir, its ``checkpoints/`` or a step directory: the ``config.json`` in or above it)."""
  from fjt.config import load_config, with_run_defaults

  if is_config_path(source):
    return load_config(source)
  saved = find_record(source)
  if saved is None:
    raise ConfigError(f"{os.fspath(source)!r} has no config.json in it or in the 3 directories "
                      "above it: give a run workdir (or a checkpoint inside one) or a config file")
  return with_run_defaults(ml_collections.ConfigDict(_tuples(saved)))


def load_model(source: str | os.PathLike
               ) -> tuple[nn.Module, dict[str, Any], ml_collections.ConfigDict]:
  """``(model, variables, config)`` of a run or checkpoint (its newest step's ``params`` and
  ``batch_stats``) or of a config file (its fresh variables, initialised as the run would)."""
  import jax

  from fjt.data import load_dataset
  from fjt.models import create_model
  from fjt.state import create_from_config

  config = run_config(source)
  if is_config_path(source):
    example = jax.tree.map(lambda v: v[:1], load_dataset(config.data).train["x"])
    model, _, state = create_from_config(config, example)
    return model, state.variables, config
  return create_model(config.model), load_variables(source), config  # LoRA: merged.


def load_variables(source: str | os.PathLike) -> dict[str, Any]:
  """``{"params", "batch_stats"}`` that the model of a checkpoint applies
  (``fjt.checkpoint.load_variables``); for a LoRA run's checkpoint (it holds ``base``), the base
  merged with the adapters by the run's ``lora.alpha`` (``fjt.lora.merge``)."""
  from fjt import checkpoint
  from fjt import lora as fjt_lora

  if not any(p.startswith("base/") for p in checkpoint.saved_shapes(source)):
    return checkpoint.load_variables(source)
  base, adapters, batch_stats = fjt_lora.load(source)
  return {"params": fjt_lora.merge(base, adapters, run_config(source).lora.alpha),
          "batch_stats": batch_stats}


def run_vocabulary(source: str | os.PathLike) -> list[str]:
  """The vocabulary (words in id order) of a run or config: its dataset rebuilt from
  ``config.data`` (deterministic), whose info must carry one (``fjt.data.dataset_vocabulary``)."""
  from fjt.data import dataset_vocabulary, load_dataset

  config = run_config(source)
  check_run_data(source, config)
  vocab = dataset_vocabulary(load_dataset(config.data).info)
  if vocab is None:
    raise ConfigError(f"{os.fspath(source)}: dataset {config.data.get('name')!r} carries no word "
                      "vocabulary (info['vocab'] or a word tokenizer), so words cannot be mapped "
                      "to ids")
  return vocab
