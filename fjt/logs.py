"""What a run writes about itself: metrics.jsonl, TensorBoard events, metrics.png."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping

from fjt.files import write_atomic


class LogWriteError(Exception):
  """A file a run writes about itself (``metrics.jsonl``, TensorBoard events, ``summary.json``,
  ``metrics.png``, ``config.json``) could not be written: a full or vanished disk. The loop stops
  cleanly on it; the checkpoints already complete are untouched."""


def log_write_error(path: str, error: BaseException) -> LogWriteError:
  """One line for a failed write of a run's log file ``path``."""
  cause = getattr(error, "strerror", None) or (str(error).splitlines() or [""])[0]
  return LogWriteError(f"writing {path} failed: {cause} ({type(error).__name__}); the "
                       "checkpoints already saved are complete: free disk space, then run the "
                       "same command to resume from the last saved step")


def say(message: str) -> None:
  """One plain line on stderr (``fjt: ...``): what a run decided or noticed on the user's
  behalf. Not a ``warnings`` warning, whose two-line form names fjt's source line."""
  print(f"fjt: {message}", file=sys.stderr, flush=True)


def one_line_errors() -> None:
  """For a command-line tool: a warning is one plain line (not the source line that raised
  it), and the errors Orbax and TensorStore log from their own threads after a failed save
  (absl and asyncio log records, callbacks into a closed event loop) are left to the tool's
  one-line error. Process-wide; library code does not call it."""
  import logging
  import warnings
  warnings.formatwarning = lambda message, category, *_: f"warning: {message}\n"
  for name in ("absl", "asyncio"):
    logging.getLogger(name).setLevel(logging.CRITICAL)
  closed = lambda value: isinstance(value, RuntimeError) and str(value) == "Event loop is closed"
  excepthook, unraisablehook = sys.excepthook, sys.unraisablehook
  sys.excepthook = lambda kind, value, tb: None if closed(value) else excepthook(kind, value, tb)
  sys.unraisablehook = lambda u: None if closed(u.exc_value) else unraisablehook(u)


class _EventFile:
  """TensorBoard scalars written in the caller's thread (tensorboardX's event file format and
  protos; no TensorFlow needed). tensorboardX's ``SummaryWriter`` writes from a thread of its
  own: when that thread dies (a full disk), its queue fills and ``add_scalar`` blocks forever;
  here a failed write is an ``OSError`` where it happens."""

  def __init__(self, logdir: str):
    from tensorboardX.event_file_writer import EventsWriter  # Slow to import.
    self._writer = EventsWriter(os.path.join(logdir, "events"))
    self._writer.flush()

  def add_scalars(self, prefix: str, metrics: Mapping[str, float], step: int) -> None:
    from tensorboardX.proto import event_pb2
    from tensorboardX.summary import scalar
    for name, value in metrics.items():
      self._writer.write_event(event_pb2.Event(
          wall_time=time.time(), step=int(step), summary=scalar(f"{prefix}/{name}", float(value))))
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class MetricWriter:
  """Appends one JSON object per logged step to ``metrics.jsonl`` and writes the
  same scalars as TensorBoard events (``_EventFile``: no background thread).

  The file is append-only: a run that resumes at ``start_step`` keeps the rows up to
  that step and appends after them. Rows past ``start_step`` (logged after the
  checkpoint the run resumes from) and a line torn by a kill are dropped by an atomic
  rewrite (``keep_rows``) before anything is appended, so a process killed at any
  moment leaves every kept row on disk. A run at step 0 keeps no rows. A line that is not a row
  (damage) is set aside in ``metrics.jsonl.damaged`` with one warning. A write that fails (a
  full disk) is a ``LogWriteError`` naming the file; after one, ``close`` raises nothing more.
  """

  def __init__(self, workdir: str, start_step: int = 0, enabled: bool = True):
    self.enabled, self.workdir = enabled, workdir
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._file = self._tb = None
    self._failed = False
    if enabled:
      keep_rows(self.path, start_step)
      with self._writing(self.path):
        self._file = open(self.path, "a", encoding="utf-8")
      with self._writing(os.path.join(workdir, "events.out.tfevents.*")):
        self._tb = _EventFile(workdir)

  @contextlib.contextmanager
  def _writing(self, path: str) -> Iterator[None]:
    try:
      yield
    except OSError as e:
      self._failed = True
      raise log_write_error(path, e) from e

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "split": split, **{k: float(v) for k, v in metrics.items()}}
    with self._writing(self.path):
      self._file.write(json.dumps(row) + "\n")
      self._file.flush()
    with self._writing(os.path.join(self.workdir, "events.out.tfevents.*")):
      self._tb.add_scalars(split, metrics, step)

  def close(self) -> None:
    files, self._file, self._tb = (self._file, self._tb), None, None
    for f in files:
      if f is None:
        continue
      try:
        f.close()
      except OSError as e:
        if not self._failed:  # After a failure the run is stopping already: one line.
          self._failed = True
          raise log_write_error(self.path if f is files[0] else self.workdir, e) from e


def _complete_lines(path: str) -> tuple[list[str], bool]:
  """``(lines, torn)``: the newline-terminated lines of a file, and whether text follows the
  last newline (a row whose write was cut off by a kill)."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  lines = text.split("\n")
  return [line + "\n" for line in lines[:-1]], bool(lines[-1])


def _rows(lines: list[str]) -> tuple[list[tuple[str, dict]], list[tuple[int, str]]]:
  """``([(line, row)], [(line number, line)])``: the rows among ``lines`` (blank lines skipped),
  and the lines that are not a metrics row with a step (damage)."""
  rows, damaged = [], []
  for number, line in enumerate(lines, 1):
    if line.strip():
      try:
        row = json.loads(line)
        int(row["step"])
      except (ValueError, TypeError, KeyError):
        damaged.append((number, line))
        continue
      rows.append((line, row))
  return rows, damaged


def read_metrics(path: str) -> list[dict]:
  """The rows of a ``metrics.jsonl``, without a last line torn by a kill or a damaged line."""
  return [row for _, row in _rows(_complete_lines(path)[0])[0]]


def keep_rows(path: str, last_step: int) -> None:
  """Drops the rows of ``metrics.jsonl`` past ``last_step`` and a torn last line, if any, and
  sets each line that is not a row aside in ``metrics.jsonl.damaged`` (appended; one warning).

  The kept lines are written, byte for byte, by ``fjt.files.write_atomic``: at any moment
  ``path`` holds either all its rows or the kept ones.
  """
  if not os.path.exists(path):
    return
  lines, torn = _complete_lines(path)
  rows, damaged = _rows(lines)
  kept = [line for line, row in rows if row["step"] <= last_step]
  if not torn and len(kept) == len(lines):
    return
  if damaged:
    aside = path + ".damaged"
    try:
      with open(aside, "a", encoding="utf-8") as f:
        f.writelines(line for _, line in damaged)
        f.flush()
        os.fsync(f.fileno())
    except OSError as e:
      raise log_write_error(aside, e) from e
    say(f"{path}: {len(damaged)} line(s) that are not metrics rows (first: line "
        f"{damaged[0][0]}) set aside in {aside}")
  try:
    write_atomic(path, "".join(kept))
  except OSError as e:
    raise log_write_error(path, e) from e


def plot_metrics(jsonl_path: str, png_path: str, eval_metric: str,
                 baselines: Mapping[str, float] | None = None,
                 curves: Mapping[str, str] | None = None) -> None:
  """Train loss and the eval metric against step, side by side; each of
  ``baselines`` (name -> value of the eval metric) is a dashed line, each of ``curves``
  (name -> another run's metrics.jsonl) that run's eval metric against its steps."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = read_metrics(jsonl_path)
  fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(10, 4))
  for split, ax, key in (("train", ax_loss, "loss"), ("eval", ax_loss, "loss"),
                         ("eval", ax_eval, eval_metric)):
    points = [(r["step"], r[key]) for r in rows if r["split"] == split and key in r
              and math.isfinite(r[key])]
    if points:
      ax.plot(*zip(*points), marker="." if split == "eval" else None, label=f"{split} {key}")
  for name, value in (baselines or {}).items():
    ax_eval.axhline(value, color="gray", linestyle="--", label=name)
  for name, path in (curves or {}).items():
    points = [(r["step"], r[eval_metric]) for r in read_metrics(path)
              if r["split"] == "eval" and eval_metric in r and math.isfinite(r[eval_metric])]
    if points:
      ax_eval.plot(*zip(*points), marker=".", linestyle="--", label=name)
  ax_loss.set(xlabel="step", ylabel="loss", title="loss")
  ax_eval.set(xlabel="step", ylabel=eval_metric, title=f"eval {eval_metric}")
  if eval_metric == "perplexity":
    ax_eval.set_yscale("log")
  for ax in (ax_loss, ax_eval):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  try:
    write_atomic(png_path, lambda f: fig.savefig(f, dpi=100, format="png"))
  finally:
    plt.close(fig)


def write_summary(workdir: str, summary: Mapping, eval_metric: str,
                  baselines: Mapping[str, float] | None = None,
                  curves: Mapping[str, str] | None = None) -> None:
  """Writes ``WORKDIR/summary.json`` and plots ``WORKDIR/metrics.jsonl`` to ``metrics.png``
  (``plot_metrics``); both atomically (``fjt.files.write_atomic``). A failed write is a
  ``LogWriteError`` naming the file."""
  path = os.path.join(workdir, "summary.json")
  try:
    write_atomic(path, json.dumps(summary, indent=2))
    path = os.path.join(workdir, "metrics.png")
    plot_metrics(os.path.join(workdir, "metrics.jsonl"), path, eval_metric, baselines, curves)
  except OSError as e:
    raise log_write_error(path, e) from e


class RunLog:
  """Everything a run writes about itself in its workdir, for every fjt loop: ``config.json``,
  ``metrics.jsonl`` and TensorBoard events (``MetricWriter``), ``summary.json`` and
  ``metrics.png``. Only process 0 of a multi-process run writes (``enabled``)."""

  def __init__(self, workdir: str, record: str, start_step: int = 0, enabled: bool = True):
    """``record``: the text of ``config.json`` (``fjt.runs.record_file``)."""
    self.workdir, self.enabled = workdir, enabled
    if enabled:  # Atomic: a kill while resuming leaves the old record, never a torn one.
      path = os.path.join(workdir, "config.json")
      try:
        write_atomic(path, record)
      except OSError as e:
        raise log_write_error(path, e) from e
    self.metrics = MetricWriter(workdir, start_step=start_step, enabled=enabled)
    self._open = True

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    self.metrics.write(step, split, metrics)

  def finish(self, summary: Mapping, eval_metric: str,
             baselines: Mapping[str, float] | None = None,
             curves: Mapping[str, str] | None = None) -> None:
    """Writes ``summary.json`` and plots the logged metrics (``write_summary``)."""
    self.close()
    if self.enabled:
      write_summary(self.workdir, summary, eval_metric, baselines, curves)

  def close(self) -> None:
    if self._open:
      self._open = False
      self.metrics.close()
