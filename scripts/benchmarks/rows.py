"""What a benchmark reports: ``Row`` (a value against a baseline measured in the same process),
the ``Sizes`` the benchmarks run on, and the rows as a markdown table or JSON.

Every row is ``{"name", "value", "baseline", "unit", "ratio", "target", "notes"}`` with
``ratio = value / baseline`` and ``target`` a bound on the ratio (``">= 1.15"``, ``"<= 3"``) or
None for a row that only reports.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

PyTree = Any
MB = 2**20


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What the benchmarks run on; ``FULL`` is the reported configuration, ``QUICK`` a smoke test.

  Attributes:
    mlp_features, mlp_inputs, mlp_batch: the MLP of the train-step rows (784 inputs, BatchNorm).
    cnn_batch: batch of the digits CNN (None: the config's ``train.batch_size``).
    mlp_steps, cnn_steps: train steps per timed call.
    matmul: side of the square float32 matmuls that measure the peak FLOP/s.
    models, model_bytes: the inputs of the aggregation rows (float32 trees).
    state_bytes: size of the train state of the checkpoint rows.
    cold_restore: also restore from disk after dropping the page cache (root on Linux only;
      it slows everything else running on the machine for a while).
    repeats: timed calls per contender (the median is kept).
    torch_compile: also try ``torch.compile`` for the PyTorch baselines.
    gpt, gpt_steps: the GPT of ``train_step_gpt_vs_torch`` (layers, width, heads, block,
      batch) and its train steps per timed call.
    gpt2, gpt2_vocab, gpt2_steps: likewise for ``gpt2_124m_rows`` (GPT-2 small on a GPU; None
      leaves those rows out).
    merge_gpt2: the GPT-2-shaped trees of ``merge_ties_vs_memcpy`` (layers, width, vocab, block).
    remat_gpt: the GPT of ``gpt_remat_temp_bytes_vs_plain`` (layers, width, heads, block, batch).
  """
  mlp_features: tuple[int, ...] = (1024, 1024)
  mlp_inputs: int = 784
  mlp_batch: int = 256
  cnn_batch: int | None = None
  mlp_steps: int = 40
  cnn_steps: int = 200
  matmul: int = 2048
  models: int = 8
  model_bytes: int = 256 * MB
  state_bytes: int = 256 * MB
  cold_restore: bool = True
  repeats: int = 9
  torch_compile: bool = True
  sharded_vocab: int = 5000  # NNLM of configs/text_nnlm.py: a 54 MB train state (AdamW).
  gpt: tuple[int, int, int, int, int] = (2, 256, 4, 64, 32)  # layers, width, heads, block, batch
  gpt_steps: int = 5
  gpt2: tuple[int, int, int, int, int] | None = None  # GPT-2 124M rows (a GPU's): None skips them.
  gpt2_vocab: int = 50257
  gpt2_steps: int = 10
  merge_gpt2: tuple[int, int, int, int] = (12, 768, 50257, 1024)  # layers, width, vocab, block
  remat_gpt: tuple[int, int, int, int, int] = (12, 256, 4, 256, 16)


FULL = Sizes()
# On a GPU a step of the MLP takes tens of microseconds: more steps per timed call, and a matmul
# big enough to reach the GPU's peak.
GPU = dataclasses.replace(FULL, mlp_steps=400, cnn_steps=400, matmul=8192,
                          gpt2=(12, 768, 12, 1024, 16))
QUICK = Sizes(mlp_features=(64, 64), mlp_batch=32, cnn_batch=16, mlp_steps=3, cnn_steps=3,
              matmul=128, model_bytes=1 * MB, state_bytes=1 * MB, cold_restore=False, repeats=2, torch_compile=False,
              sharded_vocab=500, gpt=(1, 32, 2, 16, 4), gpt_steps=2, merge_gpt2=(1, 32, 100, 16),
              remat_gpt=(2, 32, 2, 16, 4))


@dataclasses.dataclass
class Row:
  """One measurement: ``value`` of fjt against ``baseline``, both in ``unit``."""
  name: str
  value: float
  baseline: float
  unit: str
  target: str | None
  notes: str = ""

  @property
  def ratio(self) -> float:
    return self.value / self.baseline if self.baseline else float("nan")

  def met(self) -> bool | None:
    """Whether ``ratio`` meets ``target``; None for report-only rows."""
    if self.target is None:
      return None
    op, bound = self.target.split()
    return self.ratio >= float(bound) if op == ">=" else self.ratio <= float(bound)

  def as_dict(self) -> dict[str, Any]:
    return {"name": self.name, "value": self.value, "baseline": self.baseline, "unit": self.unit,
            "ratio": self.ratio, "target": self.target, "notes": self.notes}


def format_table(rows: Sequence[Row], info: Mapping[str, str] | None = None) -> str:
  """The rows as a markdown table (ratio, target, whether met) after a line on the machine,
  then each row's notes (what exactly was compared, rooflines)."""
  lines = []
  if info:
    lines += [", ".join(f"{k}: {v}" for k, v in info.items()), ""]
  lines += ["| name | value | baseline | unit | ratio | target | met |",
            "|---|---:|---:|---|---:|---|---|"]
  for r in rows:
    met = {None: "", True: "yes", False: "**no**"}[r.met()]
    lines.append(f"| {r.name} | {r.value:,.4g} | {r.baseline:,.4g} | {r.unit} | {r.ratio:.2f} | "
                 f"{r.target or 'report'} | {met} |")
  lines += [""] + [f"- {r.name}: {r.notes}" for r in rows if r.notes]
  return "\n".join(lines)


def write_json(rows: Sequence[Row], path: str) -> None:
  """The rows as a JSON list of ``Row.as_dict()``."""
  with open(path, "w", encoding="utf-8") as f:
    json.dump([r.as_dict() for r in rows], f, indent=2)
