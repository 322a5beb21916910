"""The exit codes every fjt script returns, and the one place errors become them.

===  =======================================================================================
0    done (a finished run evaluated again included)
1    the work failed: a NaN or infinite loss or parameter, a non-finite eval metric, a damaged
     checkpoint, a failed save, a log file that could not be written (a full disk)
2    bad input or usage: a config key, a file, a path, a changed config in a workdir, a
     workdir in use, a missing optional package
3    a peer process of a multi-process run stopped answering (``fjt.distributed``)
4    stopped by SIGTERM/SIGINT after saving the current step (``fjt.preemption``)
128+N a second signal N ended the process at once, without saving
===  =======================================================================================
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from fjt.checkpoint import CheckpointError, CheckpointMismatchError
from fjt.checks import NonFiniteLossError
from fjt.config import ConfigError
from fjt.logs import LogWriteError
from fjt.preemption import EXIT_STOPPED, StoppedBySignal
from fjt.distributed import EXIT_PEER_LOST, PeerLostError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

# Most specific first: ConfigError and the mismatch errors are ValueErrors too.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (ConfigError, EXIT_USAGE),
    (NonFiniteLossError, EXIT_FAILED),
    (CheckpointError, EXIT_FAILED),
    (CheckpointMismatchError, EXIT_FAILED),
    (LogWriteError, EXIT_FAILED),
    (StoppedBySignal, EXIT_STOPPED),
    (PeerLostError, EXIT_PEER_LOST),
    (ValueError, EXIT_USAGE),
    (ImportError, EXIT_USAGE),
    (OSError, EXIT_USAGE),
)


def exit_code(error: BaseException) -> int | None:
  """The exit code of ``error`` by ``EXIT_CODES``; None for an error no script expects (a bug:
  let its traceback show)."""
  return next((code for kind, code in EXIT_CODES if isinstance(error, kind)), None)


def run(body: Callable[[], int | None]) -> int:
  """Runs a script's ``body`` and returns its exit code: ``body``'s own (None: 0), or that of
  the error it raised, printed as one line (``error: ...``; ``fjt: ...`` for a stop by signal).
  A lost peer ends the process at once: JAX's shutdown would wait on the peer and abort."""
  try:
    return body() or EXIT_OK
  except BaseException as e:  # Sorted by EXIT_CODES; anything else propagates.
    code = exit_code(e)
    if code is None:
      raise
    print(f"{'fjt' if code == EXIT_STOPPED else 'error'}: {e}", file=sys.stderr, flush=True)
    if code == EXIT_PEER_LOST:
      os._exit(code)
    return code
