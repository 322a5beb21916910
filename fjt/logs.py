"""What a run writes about itself: metrics.jsonl, TensorBoard events, metrics.png."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping


class MetricWriter:
  """Appends one JSON object per logged step to ``metrics.jsonl`` and writes the
  same scalars as TensorBoard events (tensorboardX; no TensorFlow needed).

  A run that starts at step 0 starts a new ``metrics.jsonl``; one that resumes
  at ``start_step`` keeps the rows up to that step and appends after them.
  """

  def __init__(self, workdir: str, start_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # Imported here: it is slow to import.
      self._tb = SummaryWriter(logdir=workdir, flush_secs=10)
      kept = []
      if start_step and os.path.exists(self.path):
        kept = [r for r in read_metrics(self.path) if r["step"] <= start_step]
      self._file = open(self.path, "w", encoding="utf-8")
      self._file.writelines(json.dumps(r) + "\n" for r in kept)

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


def read_metrics(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_metrics(jsonl_path: str, png_path: str, eval_metric: str,
                 baselines: Mapping[str, float] | None = None) -> None:
  """Train loss and the eval metric against step, side by side; each of
  ``baselines`` (name -> value of the eval metric) is a dashed line."""
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
             baselines: Mapping[str, float] | None = None) -> None:
    """Writes ``summary.json`` and plots the logged metrics (``plot_metrics``)."""
    self.close()
    if self.enabled:
      with open(os.path.join(self.workdir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
      plot_metrics(self.metrics.path, os.path.join(self.workdir, "metrics.png"), eval_metric,
                   baselines)

  def close(self) -> None:
    if self._open:
      self._open = False
      self.metrics.close()
