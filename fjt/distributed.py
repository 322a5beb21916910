"""The processes of a multi-process run: start-up through ``jax.distributed``, agreement on the
config, and lost peers (a ``Watchdog`` that ends a process whose collectives stopped answering).

Meshes and placement over the processes' devices are ``fjt.sharding``'s.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import jax

from fjt.config import ConfigError
from fjt.runs import config_changes


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, timeout_s: int = 60) -> None:
  """Joins a multi-process run through ``jax.distributed`` (call before any other JAX use).

  On CPU the cross-process collectives go through gloo. ``timeout_s`` bounds both
  start-up and the detection of a dead peer (the coordination service's heartbeat).
  Arguments left ``None`` come from JAX's environment (``JAX_COORDINATOR_ADDRESS``,
  or a cluster it detects, such as SLURM).
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # The coordination service's own verdict on a dead peer aborts the process with a C++ stack
  # trace; the Watchdog (timeout_s) must speak first, so the heartbeat waits twice as long.
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id, initialization_timeout=timeout_s,
                             heartbeat_timeout_seconds=2 * timeout_s + 10,
                             shutdown_timeout_seconds=timeout_s)


def check_same_config(record: Mapping[str, Any], name: str, timeout_s: float = 60) -> None:
  """Refuses to train when the processes of one run were started with different configs.

  Each process publishes ``record`` (a config as ``fjt.runs.as_record`` makes it) in the
  coordination service's key-value store under ``name`` (e.g. the workdir); process 0 compares
  every other's with its own, the others compare theirs with process 0's, so each process of
  a mismatched run raises ``ConfigError`` naming the differing keys, before any work. A no-op
  in a single-process run.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed
  client, me = distributed.global_state.client, jax.process_index()
  key = lambda i: f"fjt/config/{name}/{i}"
  client.key_value_set(key(me), json.dumps(record, sort_keys=True))
  for other in (range(1, jax.process_count()) if me == 0 else (0,)):
    theirs = json.loads(client.blocking_key_value_get(key(other), int(timeout_s * 1000)))
    first, differs = (record, other) if me == 0 else (theirs, me)  # Process 0's, and which.
    changes = config_changes(first, theirs if me == 0 else record)
    if changes:
      raise ConfigError(
          f"the processes of this run were started with different configs (process {differs} vs "
          "process 0): " + "; ".join(map(str, changes)) + "; start every process with the same "
          "--config and overrides")


EXIT_PEER_LOST = 3  # A process of a multi-process run stopped answering.


class PeerLostError(RuntimeError):
  """A process of a multi-process run stopped answering (died, or its host went away)."""


_ALIVE = "fjt/alive/"  # Key-value prefix: each process's Watchdog counts up under it.


def _alive_counts(client) -> dict[int, str]:
  return {int(key.rsplit("/", 1)[1]): value for key, value in client.key_value_dir_get(_ALIVE)}


def silent_processes(wait_s: float = 2.0) -> list[int] | None:
  """The processes whose Watchdog stopped counting in the coordination service's key-value
  store over ``wait_s`` seconds (a dead process counts no more); ``[0]`` if the service itself
  (process 0) no longer answers; None in a single-process run."""
  from jax._src import distributed
  client = distributed.global_state.client
  if client is None:
    return None
  try:
    before = _alive_counts(client)
    time.sleep(wait_s)
    after = _alive_counts(client)
  except Exception:  # The coordination service runs in process 0.
    return [0] if jax.process_index() != 0 else None
  me = jax.process_index()
  return [i for i in range(jax.process_count())
          if i != me and (i not in after or after[i] == before.get(i))]


def describe_lost_peers(wait_s: float = 2.0) -> str:
  """Which processes stopped answering (``silent_processes``), as the start of an error line."""
  lost = silent_processes(wait_s)
  if lost:
    return f"process {', '.join(map(str, lost))} stopped answering"
  return "a peer process stopped answering"


def peer_lost(error: BaseException, step: int) -> PeerLostError:
  """``error`` (a collective that failed in a multi-process run) as one line naming the lost
  process and the step."""
  cause = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
  return PeerLostError(f"process {jax.process_index()} of {jax.process_count()}: "
                       f"{describe_lost_peers()} during step {step} ({cause})")


class Watchdog:
  """Ends the process with a clear error when ``beat()`` is not called for ``timeout_s``.

  A multi-process run whose peer died blocks inside a collective; this thread is
  the bound on how long, whatever the transport does.
  """

  def __init__(self, timeout_s: float, what: str = "a training step"):
    from jax._src import distributed
    self.timeout_s, self.what = timeout_s, what
    self._client = distributed.global_state.client
    self._last, self.step = time.monotonic(), None
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._watch, name="fjt-watchdog", daemon=True)
    self._thread.start()

  def beat(self, step: int | None = None) -> None:
    """Progress was made; ``step`` (the last one done) is named if the run is found stuck."""
    self._last, self.step = time.monotonic(), step

  def _watch(self) -> None:
    interval, count = min(1.0, self.timeout_s / 4), 0
    while not self._stop.wait(interval):
      count += 1
      if self._client is not None:  # Tells the others this process is alive.
        try:
          self._client.key_value_set(f"{_ALIVE}{jax.process_index()}", str(count),
                                     allow_overwrite=True)
        except Exception:
          pass  # The coordinator is gone; the timeout below says so.
      if time.monotonic() - self._last > self.timeout_s:
        after = "" if self.step is None else f" after step {self.step}"
        sys.stderr.write(
            f"error: process {jax.process_index()} of {jax.process_count()}: "
            f"{describe_lost_peers(3 * interval)}; {self.what} made no progress for "
            f"{self.timeout_s:.0f} s{after} (config key 'distributed.timeout_s'). Exiting.\n")
        sys.stderr.flush()
        os._exit(EXIT_PEER_LOST)

  def stop(self) -> None:
    self._stop.set()
