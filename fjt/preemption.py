"""SIGTERM and SIGINT during a run: finish the step, save it, say so, stop.

Schedulers and preemptible VMs stop a job with SIGTERM (then SIGKILL a grace period later);
people press Ctrl-C (SIGINT). ``StopSignals`` turns either into a request that the loop reads
between steps (``requested(step)``); the loop then saves that step, waits for the save and raises
``StoppedBySignal``, which ``scripts/train.py`` prints as one line and exits with
``EXIT_STOPPED``. A second signal ends the process at once (exit 128 + signal number), without
saving.

In a multi-process run every process must stop after the same step, or the survivors would
wait forever in a collective. There SIGTERM is left to JAX's preemption service (installed by
``jax.distributed.initialize``, as Orbax's preemption support uses it): the notice reaches every
process, and ``jax.experimental.multihost_utils.reached_preemption_sync_point`` is True on all of
them at the same step. SIGINT on one process is forwarded to that service as a SIGTERM.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import jax

EXIT_STOPPED = 4  # Stopped by a signal after saving the current step.

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StoppedBySignal(Exception):
  """A run stopped by SIGTERM/SIGINT after saving its current step."""

  def __init__(self, step: int, signal_name: str, checkpoint_dir: str):
    super().__init__(f"stopped at step {step} by {signal_name}; checkpoint saved; run the same "
                     "command to resume")
    self.step, self.signal_name, self.checkpoint_dir = step, signal_name, checkpoint_dir


class StopSignals:
  """Catches SIGTERM and SIGINT while a run is inside this context; restores the previous
  handlers on exit. Signals are caught only in the main thread (Python delivers them there);
  elsewhere this is a no-op and the signals keep their handlers."""

  def __init__(self):
    self.signal_name: str | None = None
    self._previous: dict[int, object] = {}
    self._multi = jax.process_count() > 1

  def __enter__(self) -> StopSignals:
    if threading.current_thread() is not threading.main_thread():
      return self
    for signum in _SIGNALS:
      if self._multi and signum == signal.SIGTERM:
        continue  # JAX's preemption service handles it for every process.
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _handle(self, signum: int, frame) -> None:
    name = signal.Signals(signum).name
    if self.signal_name is not None:
      sys.stderr.write(f"fjt: second signal ({name}): exiting at once, without saving\n")
      sys.stderr.flush()
      os._exit(128 + signum)
    self.signal_name = name
    sys.stderr.write(f"fjt: {name} received: finishing the current step and saving it "
                     "(send it again to exit at once)\n")
    sys.stderr.flush()
    if self._multi:
      os.kill(os.getpid(), signal.SIGTERM)  # To JAX's preemption service: all processes agree.

  def requested(self, step: int) -> bool:
    """Whether to stop after ``step`` (call after every step; the same answer on every
    process of a multi-process run)."""
    if not self._multi:
      return self.signal_name is not None
    from jax.experimental import multihost_utils
    if multihost_utils.reached_preemption_sync_point(step):
      self.signal_name = self.signal_name or "SIGTERM"
      return True
    return False
