"""The two errors of reading a checkpoint: it cannot be read as written, or it does not fit."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
  from fjt.checkpoint.report import LoadReport


class CheckpointError(RuntimeError):
  """A checkpoint that is missing or cannot be read as written."""


class CheckpointMismatchError(ValueError):
  """The checkpoint's tree does not fit the target; ``.report`` says where."""

  def __init__(self, message: str, report: LoadReport):
    super().__init__(message)
    self.report = report
