"""The checkpoints of one training run, ``WORKDIR/checkpoints/<step>``: asynchronous saves
sealed with their manifests, retention, and a restore that skips what a killed save left."""

from __future__ import annotations

import dataclasses
import os
import threading
import types
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from fjt import sharding
from fjt.checkpoint import integrity
from fjt.checkpoint.errors import CheckpointError
from fjt.checkpoint.integrity import MANIFEST
from fjt.checkpoint.io import _handler, load, saved_mesh, step_dirs
from fjt.config import ConfigError, positive_int
from fjt.logs import say
from fjt.tree import to_nested_dict

PyTree = Any


def _mesh_shape(tree: PyTree) -> dict[str, int] | None:
  mesh = sharding.mesh_of(tree)
  return None if mesh is None else {name: int(size) for name, size in mesh.shape.items()}


@dataclasses.dataclass(kw_only=True)
class _RecordedBestN(ocp.checkpoint_managers.BestN):
  """Orbax's ``BestN`` ranking each step by the eval metrics the run recorded in the step's
  manifest (``saved``: step -> metrics), not by Orbax's own step metadata, which a reopened
  manager reads back empty: without this, every resume deleted the best step at its next save."""
  saved: Mapping[int, Mapping[str, float]] = dataclasses.field(default_factory=dict)

  def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> Sequence[bool]:
    infos = [types.SimpleNamespace(step=c.step, time=c.time,
                                   metrics=self.saved.get(c.step, c.metrics or None))
             for c in checkpoints]
    return super().should_preserve(infos, context=context)


def _host_views(tree: PyTree) -> list[np.ndarray] | None:
  """Zero-copy numpy views of every shard of every array of ``tree``, or None unless all of
  them are in this process's CPU memory (one process, CPU devices).

  While a view is alive JAX cannot donate (reuse) the buffer under it: a train step donating the
  state then copies instead, so the saved values stay intact until Orbax holds views of its own.
  On CPU that is all Orbax's blocking phase does too ("copying" to host is making such views).
  """
  if jax.process_count() != 1:
    return None
  views = []
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array):
      for shard in leaf.addressable_shards:
        if shard.device.platform != "cpu":
          return None
        views.append(np.asarray(shard.data))
  return views


class RunCheckpointer:
  """Checkpoints of one training run under ``WORKDIR/checkpoints/<step>``.

  Saves are asynchronous: ``save`` returns once the state is safe from later
  updates (copied off an accelerator; on CPU, pinned against donation, which
  copies nothing), and the checkpoint is written in the background into a
  temporary directory renamed when complete, then sealed with its manifest, so a
  run killed at any moment leaves only whole steps. A step is marked unsealed
  (``<step>.fjt-unsealed``) from the start of its save until its manifest is
  written, so a run killed in between is told apart from a manifest lost later.
  One save runs at a time: a save waits for the previous one. Keeps the
  ``max_to_keep`` (>= 1) newest steps plus the best one by ``best_metric``, so the
  newest step is never deleted. Errors of a background save are raised by the
  next ``save``, ``wait_until_finished`` or ``close``.

  Each step's manifest carries the run's ``record`` (its config and data fingerprint, as
  ``config.json`` holds them) and the step's eval ``metrics``: the best step is ranked by those
  after a restart, and a lost ``config.json`` is recovered from them (``fjt.runs``).
  """

  def __init__(self, workdir: str, max_to_keep: int = 2, best_metric: str | None = None,
               best_mode: str = "max", record: Mapping[str, Any] | None = None):
    if not positive_int(max_to_keep):  # As fjt.options says it for configs.
      raise ConfigError(f"config key 'checkpoint.max_to_keep': expected a positive int (a run "
                        f"never deletes its last checkpoint), got {max_to_keep!r}")
    if best_mode not in ("max", "min"):
      raise ConfigError(f"config key 'checkpoint.best_mode': expected 'max' or 'min', got {best_mode!r}")
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.record = dict(record or {})
    self._metrics: dict[int, dict[str, float]] = {}  # Eval metrics of each step, as recorded.
    policies = [ocp.checkpoint_managers.LatestN(n=max_to_keep)]
    if best_metric:  # BestN keeps the end of an ascending sort, so "max" is not reversed.
      policies.append(_RecordedBestN(
          get_metric_fn=lambda metrics: metrics[best_metric], reverse=best_mode == "min", n=1,
          keep_checkpoints_without_metrics=False, saved=self._metrics))
    self._options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        cleanup_tmp_directories=True, enable_async_checkpointing=True,
        # Old steps are removed in Orbax's background thread, off the save's path (a removed
        # 256 MB step took 50 ms of the save); close() waits for it.
        enable_background_delete=True)
    self._manager = None
    self._worker: threading.Thread | None = None  # The save in progress.
    self._error: BaseException | None = None  # What it raised.

  def _open(self) -> ocp.CheckpointManager:
    if self._manager is None:
      self._manager = ocp.CheckpointManager(self.directory, options=self._options,
                                            item_handlers=_handler())
    return self._manager

  def _unsealed_marker(self, step: int) -> str:
    return os.path.join(self.directory, f"{step}.fjt-unsealed")

  def _set_aside(self, directory: str, name: str) -> str:
    """Renames a step directory to ``name`` (``name-2``, ... if taken); nothing is deleted."""
    aside, n = os.path.join(self.directory, name), 1
    while os.path.exists(aside):
      n += 1
      aside = os.path.join(self.directory, f"{name}-{n}")
    if jax.process_index() == 0:
      os.rename(directory, aside)
    return aside

  def restore_latest(self, target: PyTree, fallback: bool = False) -> tuple[PyTree, int]:
    """``(state, step)`` from the newest step that verifies and reads cleanly, or
    ``(target, 0)`` when there is none. Leftover temporary directories of unfinished
    saves are removed.

    Every file is checked against the step's manifest (sizes and CRC-32s) first. A step
    whose save was killed before its manifest was written is set aside as
    ``unsealed-<step>`` and the previous one is tried. A damaged newest step, or one whose
    manifest is missing (unverified: it is never sealed after the fact), is an error
    naming its directory and file, unless ``fallback``: then it is renamed
    ``damaged-<step>`` (nothing is deleted), said in one line on stderr, and the next older
    one is tried. Falling back past every step is said too, and starts from step 0.
    """
    self._join()
    set_aside = 0
    unsealed = {step for step, _ in step_dirs(self.directory)
                if os.path.exists(self._unsealed_marker(step))}
    for step, directory in reversed(step_dirs(self.directory)):
      sealed = os.path.isfile(os.path.join(directory, MANIFEST))
      if not sealed and step in unsealed:
        set_aside += 1
        aside = self._set_aside(directory, f"unsealed-{step}")
        say(f"checkpoint {directory} was never sealed (the run was killed while saving it); "
             f"moved it to {aside}, trying the previous step")
        continue
      try:
        if not sealed:
          raise CheckpointError(f"checkpoint {directory}: file {MANIFEST} is missing, so its "
                                "files cannot be verified")
        state = load(directory, target)
        saved_on, resumed_on = saved_mesh(directory), _mesh_shape(target)
        if saved_on and resumed_on and saved_on != resumed_on:
          say(f"checkpoint {directory} was saved on mesh {sharding.describe_mesh(saved_on)}; "
               f"resuming on mesh {sharding.describe_mesh(resumed_on)} (resharded on restore)")
      except CheckpointError as e:
        if not fallback:
          raise CheckpointError(
              f"{e}. To resume from the newest step that reads cleanly instead, run again with "
              "--config.checkpoint.fallback=True (damaged steps are kept, renamed damaged-<step>)") from e
        set_aside += 1
        aside = self._set_aside(directory, f"damaged-{step}")
        say(f"{e}; moved it to {aside}, trying the previous step")
        continue
      self._start()
      return state, step
    if set_aside:
      say(f"no step under {self.directory} reads cleanly; training from step 0")
    self._start()
    return target, 0

  def _start(self) -> None:
    """Removes what killed saves left: temporary directories (Orbax) and unsealed markers;
    reads each step's recorded metrics (for the best step)."""
    for step, directory in step_dirs(self.directory):
      metrics = (integrity.manifest_record(directory) or {}).get("metrics")
      if isinstance(metrics, dict):
        self._metrics[step] = metrics
    self._open()
    if jax.process_index() == 0:
      for name in os.listdir(self.directory):
        if name.endswith(".fjt-unsealed"):
          os.remove(os.path.join(self.directory, name))

  def save(self, step: int, state: PyTree, metrics: dict[str, float] | None = None) -> None:
    """Starts saving ``state`` as step ``step``; returns before it is on disk."""
    self._join()  # The previous save is complete (or raises here).
    manager = self._open()
    args = ocp.args.PyTreeSave(to_nested_dict(state))
    arrays, mesh = integrity.array_specs(args.item), _mesh_shape(state)
    views = _host_views(args.item)
    if metrics is not None:
      metrics = {k: float(v) for k, v in metrics.items()}
      self._metrics[step] = metrics
    record = {**self.record, "metrics": metrics}
    main, marker = jax.process_index() == 0, self._unsealed_marker(step)
    if main:  # Before Orbax can rename the step into place.
      open(marker, "w").close()
    if views is None:  # Orbax copies the arrays to host before it returns.
      manager.save(step, args=args, metrics=metrics)

    def finish() -> None:
      try:
        if views is not None:
          manager.save(step, args=args, metrics=metrics)
          views.clear()  # Orbax holds its own views now.
        manager.wait_until_finished()
        directory = os.path.join(self.directory, str(step))
        # One writer per checkpoint in a multi-process run; max_to_keep may have removed it.
        if main and os.path.isdir(directory):
          integrity.write_manifest(directory, arrays, mesh, record)
        if main:
          os.remove(marker)
      except BaseException as e:  # Raised in the caller's thread by the next call.
        self._error = e

    self._worker = threading.Thread(target=finish, name=f"fjt-save-{step}", daemon=True)
    self._worker.start()

  def _join(self) -> None:
    if self._worker is not None:
      self._worker.join()
      self._worker = None
    error, self._error = self._error, None
    if error is not None:
      raise error

  def raise_if_failed(self) -> None:
    """Raises the error of a background save that has ended with one (a full disk, say),
    without waiting for a save still in progress: the loop calls it every step, so a failed
    save stops the run at the next step, not at the next save."""
    if self._worker is not None and not self._worker.is_alive():
      self._join()

  def wait_until_finished(self) -> None:
    """Blocks until every started save is complete, manifests included."""
    self._join()

  def close(self) -> None:
    """Waits for the save in progress, then releases Orbax's resources."""
    try:
      self._join()
    finally:
      if self._manager is not None:
        self._manager.close()
        self._manager = None
