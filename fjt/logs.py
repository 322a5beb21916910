"""What a run writes about itself: metrics.jsonl, TensorBoard events, metrics.png."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping


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


class MetricWriter:
  """Appends one JSON object per logged step to ``metrics.jsonl`` and writes the
  same scalars as TensorBoard events (tensorboardX; no TensorFlow needed).

  The file is append-only: a run that resumes at ``start_step`` keeps the rows up to
  that step and appends after them. Rows past ``start_step`` (logged after the
  checkpoint the run resumes from) and a line torn by a kill are dropped by an atomic
  rewrite (``keep_rows``) before anything is appended, so a process killed at any
  moment leaves every kept row on disk. A run at step 0 keeps no rows.
  """

  def __init__(self, workdir: str, start_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # Imported here: it is slow to import.
      keep_rows(self.path, start_step)
      self._file = open(self.path, "a", encoding="utf-8")
      self._tb = SummaryWriter(logdir=workdir, flush_secs=10)

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "split": split, **{k: float(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    for name, value in metrics.items():
      self._tb.add_scalar(f"{split}/{name}", float(value), int(step))

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      self._tb.close()


def _complete_lines(path: str) -> tuple[list[str], bool]:
  """``(lines, torn)``: the newline-terminated lines of a file, and whether text follows the
  last newline (a row whose write was cut off by a kill)."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  lines = text.split("\n")
  return [line + "\n" for line in lines[:-1]], bool(lines[-1])


def _rows(path: str, lines: list[str]) -> list[tuple[str, dict]]:
  """``(line, row)`` of each non-blank line; a line that is not a row is an error naming it."""
  rows = []
  for number, line in enumerate(lines, 1):
    if line.strip():
      try:
        row = json.loads(line)
        int(row["step"])
      except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: line {number} is not a metrics row with a step "
                         f"({type(e).__name__}: {e})") from e
      rows.append((line, row))
  return rows


def read_metrics(path: str) -> list[dict]:
  """The rows of a ``metrics.jsonl``, without a last line torn by a kill."""
  return [row for _, row in _rows(path, _complete_lines(path)[0])]


def keep_rows(path: str, last_step: int) -> None:
  """Drops the rows of ``metrics.jsonl`` past ``last_step`` and a torn last line, if any.

  The kept lines are written, byte for byte, to a temporary file that is synced and then
  renamed over ``path``: at any moment ``path`` holds either all its rows or the kept ones.
  """
  if not os.path.exists(path):
    return
  lines, torn = _complete_lines(path)
  kept = [line for line, row in _rows(path, lines) if row["step"] <= last_step]
  if not torn and len(kept) == len(lines):
    return
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(kept)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


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
  fig.savefig(png_path, dpi=100)
  plt.close(fig)


def write_summary(workdir: str, summary: Mapping, eval_metric: str,
                  baselines: Mapping[str, float] | None = None,
                  curves: Mapping[str, str] | None = None) -> None:
  """Writes ``WORKDIR/summary.json`` and plots ``WORKDIR/metrics.jsonl`` to ``metrics.png``
  (``plot_metrics``)."""
  with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  plot_metrics(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "metrics.png"),
               eval_metric, baselines, curves)


class RunLog:
  """Everything a run writes about itself in its workdir, for every fjt loop: ``config.json``,
  ``metrics.jsonl`` and TensorBoard events (``MetricWriter``), ``summary.json`` and
  ``metrics.png``. Only process 0 of a multi-process run writes (``enabled``)."""

  def __init__(self, workdir: str, config, start_step: int = 0, enabled: bool = True):
    self.workdir, self.enabled = workdir, enabled
    if enabled:
      with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2))
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
