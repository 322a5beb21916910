"""Files written whole or not at all: a kill or a full disk at any moment leaves the old file or
the new one, never a torn one.

``write_atomic`` writes into a temporary file beside the target (same directory, so the rename
stays on one file system), syncs it, renames it over the target (``os.replace``: atomic on
POSIX) and syncs the directory, so the rename itself survives a power cut. Every file fjt writes
about a run (``config.json``, ``summary.json``, ``init_from.json``, ``splits.json``, plots,
token files and their metas) goes through it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import IO

Writer = Callable[[IO], None]


def sync_directory(directory: str) -> None:
  """Flushes a directory's entries (a rename into it) to disk; a no-op where the OS cannot."""
  try:
    fd = os.open(directory or ".", os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:  # Some file systems do not sync directories.
    pass
  finally:
    os.close(fd)


def write_atomic(path: str | os.PathLike, data: str | bytes | Writer,
                 encoding: str = "utf-8") -> None:
  """Writes ``data`` to ``path`` atomically: ``str`` (as ``encoding``), ``bytes``, or a
  function ``writer(f)`` that writes into the open binary file ``f`` (``np.ndarray.tofile``,
  ``fig.savefig``, ...).

  On any error (a full disk: ``OSError`` ENOSPC) the temporary file is removed and ``path`` is
  left as it was; the error is re-raised naming ``path``.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
  try:
    with open(tmp, "wb") as f:
      if isinstance(data, str):
        f.write(data.encode(encoding))
      elif isinstance(data, (bytes, bytearray, memoryview)):
        f.write(data)
      else:
        data(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    if isinstance(e, OSError) and e.filename is None:
      raise type(e)(e.errno, f"{e.strerror or e} (writing {path})", path) from e
    raise
  sync_directory(directory)
