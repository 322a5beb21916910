"""Speed as ratios against baselines measured in the same process (the engine of ``scripts/bench.py``).

Every row is ``{"name", "value", "baseline", "unit", "ratio", "target", "notes"}`` with
``ratio = value / baseline`` and ``target`` a bound on the ratio (``">= 1.15"``, ``"<= 3"``) or
None for a row that only reports. Baselines are PyTorch on the same model and threads, copies of
the same bytes, ``torch.save`` / ``torch.load`` of the same arrays, a float32 matmul.

Timing: everything is warmed up (compiled) first; then the contenders of a row take turns, one
call each per round, in an order rotated every round, and each one's median over the rounds is
kept. Taking turns means a background load slows all of them rather than whichever ran at the
time; it cannot undo that such a load slows multi-threaded work (PyTorch's above all) more than
single-threaded work, so the script reports the CPUs other processes kept busy. Every timed call
ends with its work done (``block_until_ready``, files written).

Needs PyTorch (the ``torch`` extra) for the baselines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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
    repeats: timed calls per contender (the median is kept).
    torch_compile: also try ``torch.compile`` for the PyTorch baselines.
    gpt, gpt_steps: the GPT of ``train_step_gpt_vs_torch`` (layers, width, heads, block,
      batch) and its train steps per timed call.
    gpt2, gpt2_vocab, gpt2_steps: likewise for ``gpt2_124m_rows`` (GPT-2 small on a GPU; None
      leaves those rows out).
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
  repeats: int = 9
  torch_compile: bool = True
  sharded_vocab: int = 5000  # NNLM of configs/text_nnlm.py: a 54 MB train state (AdamW).
  gpt: tuple[int, int, int, int, int] = (2, 256, 4, 64, 32)  # layers, width, heads, block, batch
  gpt_steps: int = 5
  gpt2: tuple[int, int, int, int, int] | None = None  # GPT-2 124M rows (a GPU's): None skips them.
  gpt2_vocab: int = 50257
  gpt2_steps: int = 10


FULL = Sizes()
# On a GPU a step of the MLP takes tens of microseconds: more steps per timed call, and a matmul
# big enough to reach the GPU's peak.
GPU = dataclasses.replace(FULL, mlp_steps=400, cnn_steps=400, matmul=8192,
                          gpt2=(12, 768, 12, 1024, 16))
QUICK = Sizes(mlp_features=(64, 64), mlp_batch=32, cnn_batch=16, mlp_steps=3, cnn_steps=3,
              matmul=128, model_bytes=1 * MB, state_bytes=1 * MB, repeats=2, torch_compile=False,
              sharded_vocab=500, gpt=(1, 32, 2, 16, 4), gpt_steps=2)


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


# --- Timing --------------------------------------------------------------------------------------


class Phases(dict):
  """``{name: seconds}`` that a contender returns when it times its own phases."""


def take_turns(contenders: Mapping[str, Callable[[], Any]], repeats: int,
               warmup: int = 1) -> dict[str, float]:
  """Median seconds of each contender over ``repeats`` rounds in which each runs once.

  A contender is timed as a whole (its result is dropped) unless it returns ``Phases``: then
  those are its times (e.g. a save's blocking part and its total). The result maps each name to
  its median. ``warmup`` untimed rounds go first (compilation, caches, first-touch allocations).
  Each round starts one contender later than the previous, so none always follows the same
  one (what the previous call left in the caches and the allocator matters for memory-bound
  work).
  """
  for _ in range(warmup):
    for fn in contenders.values():
      fn()
  times: dict[str, list[float]] = {}
  names = list(contenders)
  for i in range(repeats):
    for name in names[i % len(names):] + names[:i % len(names)]:
      fn = contenders[name]
      gc.collect()
      start = time.perf_counter()
      result = fn()
      elapsed = time.perf_counter() - start
      phases = result if isinstance(result, Phases) else {name: elapsed}
      del result
      for key, seconds in phases.items():
        times.setdefault(key, []).append(seconds)
  return {key: float(np.median(values)) for key, values in times.items()}


def _blocked(fn: Callable[[], Any]) -> Callable[[], None]:
  """``fn`` followed by waiting for its jax results; the result is dropped."""
  def call() -> None:
    jax.block_until_ready(fn())
  return call


def require_torch():
  """Imports PyTorch, the baselines' library, or raises ImportError saying what to install."""
  from fjt.interop.torch import import_torch
  return import_torch("the benchmarks compare against PyTorch, which is not installed")


def torch_device():
  """Where the PyTorch baselines run: on the GPU when jax runs on one and PyTorch sees one (the
  same GPU, device 0 of both), else on the CPU."""
  torch = require_torch()
  if jax.default_backend() == "gpu" and torch.cuda.is_available():
    return torch.device("cuda", 0)
  return torch.device("cpu")


def _torch_synced(fn: Callable[[], Any]) -> Callable[[], None]:
  """``fn`` followed by waiting for PyTorch's queued GPU work (if any); the result is dropped."""
  torch = require_torch()
  cuda = torch_device().type == "cuda"

  def call() -> None:
    fn()
    if cuda:
      torch.cuda.synchronize()
  return call


def full_float32() -> str:
  """Makes jax and PyTorch multiply float32 matrices in float32 (a GPU's tensor cores would
  round the inputs to TF32 by default in jax, in PyTorch's convolutions too), so that both
  contenders and the peak do the same arithmetic; returns a note saying so. CPUs compute in
  float32 anyway."""
  torch = require_torch()
  jax.config.update("jax_default_matmul_precision", "highest")
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  return "float32 matmuls and convolutions in full float32 precision (no TF32) in jax and PyTorch"


def runs_on() -> str:
  """Where the contenders run, for the notes: ``"2 CPU threads"`` or the GPU's name."""
  if jax.default_backend() == "cpu":
    return f"{cpu_threads()} CPU threads"
  return jax.devices()[0].device_kind


def cpu_threads() -> int:
  """CPUs this process may run on: the threads of XLA's CPU pool, and of PyTorch here."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not Linux.
    return os.cpu_count() or 1


def machine() -> dict[str, str]:
  """CPU model, threads, date and library versions, for the table's header."""
  torch = require_torch()
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      found = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
    model = found.group(1).strip() if found else model
  except OSError:
    pass
  info = {"cpu": model, "threads": str(cpu_threads()), "date": datetime.date.today().isoformat(),
          "jax": jax.__version__, "torch": torch.__version__, "backend": jax.default_backend()}
  if jax.default_backend() != "cpu":
    info["device"] = jax.devices()[0].device_kind
  return info


def background_load(seconds: float = 1.0) -> float | None:
  """CPUs kept busy by other processes while this one sleeps ``seconds`` (Linux ``/proc/stat``;
  None elsewhere). A busy machine slows multi-threaded contenders most (PyTorch's OpenMP threads
  above all), which no taking of turns can undo, so the table reports it."""
  def busy_jiffies() -> int:
    with open("/proc/stat") as f:
      fields = [int(v) for v in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # All but idle and iowait.

  try:
    before = busy_jiffies()
    time.sleep(seconds)
    return (busy_jiffies() - before) / os.sysconf("SC_CLK_TCK") / seconds
  except (OSError, ValueError):
    return None


# --- Train steps ---------------------------------------------------------------------------------


def _fjt_loop(model, tx, task, batches: Sequence[dict[str, jax.Array]], steps: int,
              precision: str | None = None) -> tuple[Callable[[], None], PyTree]:
  """``run()`` doing ``steps`` jitted fjt train steps of ``model`` over the pre-placed
  ``batches`` in turn (state carried across calls, donated at each step), and the params'
  shapes (``jax.ShapeDtypeStruct``). With ``precision``, tracing and steps run under
  ``jax.default_matmul_precision(precision)``, whatever the process's default."""
  import fjt

  def scope():
    return jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()

  with scope():
    state = jax.jit(fjt.create_train_state, static_argnums=(0, 1))(
        model, tx, batches[0]["x"][:1], jax.random.PRNGKey(0))
    train_step = fjt.make_train_step(model, tx, task)
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state.params)
  carry = {"state": state}

  def run() -> None:
    state = carry.pop("state")
    with scope():
      for i in range(steps):
        state, _ = train_step(state, batches[i % len(batches)])
    carry["state"] = jax.block_until_ready(state)

  return run, params


def _fjt_train_loop(model, x: np.ndarray, y: np.ndarray, steps: int, learning_rate: float
                    ) -> tuple[Callable[[], None], PyTree]:
  """``_fjt_loop`` of SGD (momentum 0.9) classification steps over the batches ``x[i], y[i]``."""
  import fjt

  tx = fjt.create_optimizer({"name": "sgd", "learning_rate": learning_rate, "momentum": 0.9}, 1)
  batches = [{"x": jax.device_put(xb), "y": jax.device_put(yb)} for xb, yb in zip(x, y)]
  return _fjt_loop(model, tx, "classification", batches, steps)


def _hf_gpt2(vocab: int, block: int, width: int, layers: int, heads: int, device,
             learning_rate: float, fused: bool = False):
  """``(module, optimizer)``: Hugging Face's ``GPT2LMHeadModel`` of those sizes (no dropout,
  ``scaled_dot_product_attention``) on ``device`` in train mode, and AdamW with weight decay 0.1
  on its kernels only (fjt's ``decay_mask="gpt"``), ``fused`` as nanoGPT does on a GPU."""
  torch = require_torch()
  import transformers

  config = transformers.GPT2Config(vocab_size=vocab, n_positions=block, n_embd=width,
                                   n_layer=layers, n_head=heads, resid_pdrop=0.0,
                                   embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
  config._attn_implementation = "sdpa"
  module = transformers.GPT2LMHeadModel(config).to(device).train()
  named = list(module.named_parameters())
  decayed = [p.ndim > 1 and not n.endswith(("wte.weight", "wpe.weight")) for n, p in named]
  optimizer = torch.optim.AdamW(
      [{"params": [p for (_, p), d in zip(named, decayed) if d], "weight_decay": 0.1},
       {"params": [p for (_, p), d in zip(named, decayed) if not d], "weight_decay": 0.0}],
      lr=learning_rate, fused=fused)
  return module, optimizer


def _torch_train_loops(model, x: np.ndarray, y: np.ndarray, steps: int, learning_rate: float,
                       compile_: bool) -> tuple[dict[str, Callable[[], None]], list[str]]:
  """``{"torch eager": run, "torch.compile": run}`` for the PyTorch twin of ``model`` (the
  compiled one only if compiling works here), and notes on what failed."""
  torch = require_torch()
  from fjt.interop.torch_models import torch_module
  device = torch_device()

  def make(compiled: bool) -> Callable[[], None]:
    module = torch_module(model, x.shape[2:]).to(device)
    module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=learning_rate, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    nchw = x.ndim == 5  # (batches, B, H, W, C) images: PyTorch convolutions take NCHW.
    batches = [(torch.from_numpy(np.ascontiguousarray(xb.transpose(0, 3, 1, 2) if nchw else xb)
                                 ).to(device), torch.from_numpy(yb.astype(np.int64)).to(device))
               for xb, yb in zip(x, y)]

    def step(xb, yb):
      optimizer.zero_grad(set_to_none=True)
      loss = loss_fn(module(xb), yb)
      loss.backward()
      optimizer.step()
      return loss

    if compiled:
      step = torch.compile(step)
      for xb, yb in batches[:2]:  # Compiles now, so failures show here.
        step(xb, yb)

    def run() -> None:
      for i in range(steps):
        step(*batches[i % len(batches)])

    return _torch_synced(run)

  loops, notes = {"torch eager": make(False)}, []
  if compile_:
    try:
      loops["torch.compile"] = make(True)
    except Exception as e:  # Inductor needs a C++ toolchain; any failure leaves eager alone.
      notes.append(f"torch.compile failed here ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
  else:
    notes.append("torch.compile not tried (quick mode)")
  return loops, notes


def _matmul_contenders(n: int, reps: int) -> dict[str, Callable[[], None]]:
  """float32 ``(n, n) @ (n, n)``, ``reps`` times per call, in jax (jit), PyTorch and (on a CPU)
  numpy."""
  torch = require_torch()
  rng = np.random.default_rng(0)
  a, b = (rng.standard_normal((n, n), np.float32) for _ in range(2))
  ja, jb = jax.device_put(a), jax.device_put(b)
  ta, tb = torch.from_numpy(a).to(torch_device()), torch.from_numpy(b).to(torch_device())
  dot = jax.jit(jnp.dot)

  def jax_mm():
    for _ in range(reps):
      out = dot(ja, jb)
    out.block_until_ready()

  def numpy_mm():
    for _ in range(reps):
      a @ b

  def torch_mm():
    for _ in range(reps):
      ta @ tb

  contenders = {"matmul jax": jax_mm, "matmul torch": _torch_synced(torch_mm)}
  if jax.default_backend() == "cpu":
    contenders["matmul numpy"] = numpy_mm
  return contenders


def _matmul_floors(widths: Sequence[int], x: np.ndarray, steps: int
                   ) -> dict[str, Callable[[], None]]:
  """``{"matmuls xla": run, "matmuls torch": run}``: ``steps`` calls doing only the matmuls of
  an MLP train step with layer ``widths`` (forward, input and weight gradients; no first-layer
  input gradient) on the same batches, jitted in jax and eager in PyTorch: what each library's
  matmuls alone take, a floor under its whole step."""
  torch = require_torch()
  rng = np.random.default_rng(0)
  kernels = [(rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
             for a, b in zip(widths, widths[1:])]

  def matmuls(kernels, x):
    hidden = [x]
    for kernel in kernels:
      hidden.append(hidden[-1] @ kernel)
    grads, delta = [], hidden[-1]
    for i in reversed(range(len(kernels))):
      grads.append(hidden[i].T @ delta)
      if i:
        delta = delta @ kernels[i].T
    return grads

  def loop(fn, kernels, batches, sync):
    def run() -> None:
      for i in range(steps):
        out = fn(kernels, batches[i % len(batches)])
      sync(out)
    return run

  device = torch_device()
  return {
      "matmuls xla": loop(jax.jit(matmuls), [jax.device_put(k) for k in kernels],
                          [jax.device_put(xb) for xb in x], jax.block_until_ready),
      "matmuls torch": _torch_synced(loop(
          matmuls, [torch.from_numpy(k).to(device) for k in kernels],
          [torch.from_numpy(xb).to(device) for xb in x], lambda out: None)),
  }


def _dense_params(params: PyTree) -> int:
  """Kernel entries of the Dense layers: one multiply-add per example each way."""
  from fjt.tree import flatten
  return sum(math.prod(s.shape) for p, s in flatten(params).items()
             if re.search(r"(^|/)Dense_\d+/kernel$", p))


def train_step_rows(sizes: Sizes, cnn_config=None, progress: Callable[[str], None] = print
                    ) -> list[Row]:
  """``train_step_mlp_vs_torch``, ``train_step_mlp_vs_peak`` and, given the digits CNN config,
  ``train_step_cnn_vs_torch``: samples/s of ``fjt.make_train_step`` against the same model and
  optimizer (SGD, momentum 0.9) in PyTorch, eager or compiled, whichever is faster."""
  import fjt

  torch = require_torch()
  torch.set_num_threads(cpu_threads())
  rng = np.random.default_rng(0)
  rows = []

  # The MLP: 784 inputs, BatchNorm, float32; the peak matmul takes turns with it.
  batch = sizes.mlp_batch
  x = rng.standard_normal((8, batch, sizes.mlp_inputs), np.float32)
  y = rng.integers(0, 10, (8, batch), dtype=np.int32)
  model = fjt.MLP(features=sizes.mlp_features, num_classes=10)
  fjt_run, params = _fjt_train_loop(model, x, y, sizes.mlp_steps, 0.01)
  torch_runs, notes = _torch_train_loops(model, x, y, sizes.mlp_steps, 0.01, sizes.torch_compile)
  matmul_reps = 5
  widths = (sizes.mlp_inputs, *sizes.mlp_features, 10)
  contenders = {"fjt": fjt_run, **torch_runs, **_matmul_contenders(sizes.matmul, matmul_reps),
                **_matmul_floors(widths, x, sizes.mlp_steps)}
  times = take_turns(contenders, sizes.repeats)
  fjt_rate = sizes.mlp_steps * batch / times["fjt"]
  rates = {name: sizes.mlp_steps * batch / times[name] for name in torch_runs}
  best = max(rates, key=rates.get)
  floors = {name: sizes.mlp_steps * batch / times[f"matmuls {name}"] for name in ("xla", "torch")}
  shape = "x".join(str(w) for w in widths)
  rows.append(Row("train_step_mlp_vs_torch", fjt_rate, rates[best], "samples/s", ">= 1.15", "; ".join(
      [f"MLP {shape} BatchNorm, batch {batch}, SGD momentum 0.9, {runs_on()}; "
       f"baseline {best}; " + ", ".join(f"{k} {v:,.0f}/s" for k, v in rates.items())] + notes +
      [f"roofline: the step's matmuls alone (no BatchNorm, loss or update) run at "
       f"{floors['xla']:,.0f}/s in XLA and {floors['torch']:,.0f}/s in PyTorch, so with XLA's "
       f"matmuls no step can beat {best} by more than {floors['xla'] / rates[best]:.2f}x; fjt's "
       f"step runs at {fjt_rate / floors['xla']:.2f} of XLA's matmuls, {best} at "
       f"{rates[best] / floors['torch']:.2f} of PyTorch's"])))

  flops = 6 * batch * _dense_params(params)
  executed = flops - 2 * batch * widths[0] * widths[1]  # No input gradient of the first layer.
  achieved = flops * sizes.mlp_steps / times["fjt"] / 1e9
  peaks = {name: 2 * sizes.matmul**3 * matmul_reps / times[name] / 1e9
           for name in times if name.startswith("matmul ")}
  peak = max(peaks.values())
  floor = flops * sizes.mlp_steps / times["matmuls xla"] / 1e9
  rows.append(Row("train_step_mlp_vs_peak", achieved, peak, "GFLOP/s", ">= 0.85",
                  f"6 x batch x Dense kernel entries per step (the step executes {executed / flops:.0%} "
                  f"of that: no first-layer input gradient); peak = best float32 {sizes.matmul}^2 "
                  "matmul: " + ", ".join(f"{k.split()[1]} {v:.0f}" for k, v in peaks.items()) +
                  f". The step's matmuls alone in XLA (jitted, nothing else): {floor:.0f} GFLOP/s = "
                  f"{floor / peak:.2f} of the peak; the whole step is {times['matmuls xla'] / times['fjt']:.2f} "
                  "of their speed"))
  progress(f"{rows[0].name}, {rows[1].name}: {rows[0].ratio:.2f}, {rows[1].ratio:.2f}")

  if cnn_config is not None:
    dataset = fjt.load_dataset(cnn_config.data)
    model = fjt.create_model(cnn_config.model)
    batch = sizes.cnn_batch or int(cnn_config.train.batch_size)
    picks = rng.integers(0, dataset.num_train, (8, batch))
    x = np.asarray(dataset.train["x"], np.float32)[picks]
    y = np.asarray(dataset.train["y"], np.int32)[picks]
    fjt_run, _ = _fjt_train_loop(model, x, y, sizes.cnn_steps, 0.01)
    torch_runs, notes = _torch_train_loops(model, x, y, sizes.cnn_steps, 0.01, sizes.torch_compile)
    times = take_turns({"fjt": fjt_run, **torch_runs}, sizes.repeats)
    rates = {name: sizes.cnn_steps * batch / times[name] for name in torch_runs}
    best = max(rates, key=rates.get)
    rows.append(Row("train_step_cnn_vs_torch", sizes.cnn_steps * batch / times["fjt"], rates[best],
                    "samples/s", ">= 1.0", "; ".join(
                        [f"digits CNN of the config, {x.shape[2:]} inputs, batch {batch}, SGD "
                         f"momentum 0.9; baseline {best}; " +
                         ", ".join(f"{k} {v:,.0f}/s" for k, v in rates.items())] + notes)))
    progress(f"{rows[-1].name}: {rows[-1].ratio:.2f}")
  return rows


def gpt_train_step_row(sizes: Sizes, progress: Callable[[str], None] = print) -> list[Row]:
  """``train_step_gpt_vs_torch``: tokens/s of ``fjt.make_train_step`` on a small ``fjt.GPT``
  (``sizes.gpt``: layers, width, heads, block, batch; vocabulary 5,000; no dropout; AdamW)
  against Hugging Face's ``GPT2LMHeadModel`` of the same sizes and the same optimizer in
  PyTorch, eager or ``torch.compile``, whichever is faster."""
  import fjt
  torch = require_torch()

  torch.set_num_threads(cpu_threads())
  layers, width, heads, block, batch = sizes.gpt
  vocab, steps = 5000, sizes.gpt_steps
  rng = np.random.default_rng(0)
  x = rng.integers(0, vocab, (4, batch, block + 1), dtype=np.int32)
  model = fjt.models.GPT(vocab_size=vocab, block_size=block, num_layers=layers, num_heads=heads,
                  embed_dim=width, dropout_rate=0.0)
  tx = fjt.create_optimizer({"name": "adamw", "learning_rate": 1e-4, "weight_decay": 0.1,
                             "decay_mask": "gpt"}, 1)
  batches = [{"x": jax.device_put(b[:, :-1]), "y": jax.device_put(b[:, 1:])} for b in x]
  fjt_run, _ = _fjt_loop(model, tx, "language_model", batches, steps)
  device = torch_device()
  torch_batches = [torch.from_numpy(b.astype(np.int64)).to(device) for b in x]

  def make(compiled: bool) -> Callable[[], None]:
    module, optimizer = _hf_gpt2(vocab, block, width, layers, heads, device, 1e-4)

    def step(b):
      optimizer.zero_grad(set_to_none=True)
      logits = module(b[:, :-1]).logits
      loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), b[:, 1:].reshape(-1))
      loss.backward()
      optimizer.step()
      return loss

    if compiled:
      step = torch.compile(step)
      for b in torch_batches[:2]:  # Compiles now, so failures show here.
        step(b)

    def run() -> None:
      for i in range(steps):
        step(torch_batches[i % len(torch_batches)])
    return _torch_synced(run)

  torch_runs, notes = {"torch eager": make(False)}, []
  if sizes.torch_compile:
    try:
      torch_runs["torch.compile"] = make(True)
    except Exception as e:  # Inductor needs a C++ toolchain; any failure leaves eager alone.
      notes.append(f"torch.compile failed here ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
  else:
    notes.append("torch.compile not tried (quick mode)")
  times = take_turns({"fjt": fjt_run, **torch_runs}, sizes.repeats)
  tokens = steps * batch * block
  rates = {name: tokens / times[name] for name in torch_runs}
  best = max(rates, key=rates.get)
  row = Row("train_step_gpt_vs_torch", tokens / times["fjt"], rates[best], "tokens/s", ">= 1.0",
            "; ".join([f"GPT {layers} layers x {width} wide, {heads} heads, block {block}, vocab "
                       f"{vocab}, batch {batch}, AdamW (decay on kernels only), {runs_on()}; "
                       f"baseline Hugging Face GPT2LMHeadModel, {best}; " +
                       ", ".join(f"{k} {v:,.0f}/s" for k, v in rates.items())] + notes))
  progress(f"{row.name}: {row.ratio:.2f}")
  return [row]


# Dense bfloat16 tensor-core peaks (no sparsity) by device name, for MFU.
BF16_PEAK_FLOPS = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12))


def bf16_peak_flops(device_kind: str) -> float | None:
  """The dense bfloat16 peak of a GPU named ``device_kind`` (``BF16_PEAK_FLOPS``), or None."""
  return next((peak for name, peak in BF16_PEAK_FLOPS if name in device_kind), None)


def gpt_flops_per_token(params: PyTree, num_layers: int, embed_dim: int, block_size: int) -> float:
  """Training FLOPs per token, as nanoGPT and PaLM count them: ``6 N`` for the matmuls of the
  ``N`` parameters less the position embedding (the tied head counted once), plus ``12 L C T``
  for attention's scores and weighted sums (forward and backward)."""
  sizes = {"/".join(str(getattr(k, "key", k)) for k in path): math.prod(np.shape(x))
           for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  n = sum(v for k, v in sizes.items() if not k.startswith("wpe"))
  return 6.0 * n + 12.0 * num_layers * embed_dim * block_size


def gpt2_124m_rows(sizes: Sizes, progress: Callable[[str], None] = print) -> list[Row]:
  """``train_step_gpt2_124m_vs_torch`` and ``train_step_gpt2_124m_mfu``, on a GPU.

  fjt: ``fjt.GPT`` with GPT-2 small's sizes (``sizes.gpt2``: layers, width, heads, block, batch;
  vocabulary 50,257), bfloat16 compute with float32 params and AdamW state, attention
  ``"auto"`` (cuDNN's fused kernel), gradient clipping at 1, one jitted step. Baseline: the
  nanoGPT recipe on the same GPU: Hugging Face's ``GPT2LMHeadModel`` with
  ``scaled_dot_product_attention``, bfloat16 autocast, ``torch.compile``, fused AdamW, the same
  clipping. MFU: ``gpt_flops_per_token`` x tokens/s over the GPU's dense bfloat16 peak
  (``bf16_peak_flops``). Matmul precision is the default in both (the bf16 matmuls are what is
  measured)."""
  import fjt
  torch = require_torch()

  layers, width, heads, block, batch = sizes.gpt2
  vocab, steps = sizes.gpt2_vocab, sizes.gpt2_steps
  rng = np.random.default_rng(0)
  x = rng.integers(0, vocab, (2, batch, block + 1), dtype=np.int32)
  model = fjt.models.GPT(vocab_size=vocab, block_size=block, num_layers=layers, num_heads=heads,
                         embed_dim=width, dropout_rate=0.0, dtype="bfloat16")
  tx = fjt.create_optimizer({"name": "adamw", "learning_rate": 6e-4, "weight_decay": 0.1,
                             "decay_mask": "gpt", "grad_clip_norm": 1.0}, 1)
  batches = [{"x": jax.device_put(b[:, :-1]), "y": jax.device_put(b[:, 1:])} for b in x]
  fjt_run, params = _fjt_loop(model, tx, "language_model", batches, steps, precision="default")
  flops_per_token = gpt_flops_per_token(params, layers, width, block)
  device = torch_device()
  module, optimizer = _hf_gpt2(vocab, block, width, layers, heads, device, 6e-4,
                               fused=device.type == "cuda")
  compiled = torch.compile(module) if sizes.torch_compile else module
  torch_batches = [torch.from_numpy(b.astype(np.int64)).to(device) for b in x]

  def torch_step(b) -> None:
    with torch.autocast(device.type, dtype=torch.bfloat16):
      logits = compiled(b[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab),
                                             b[:, 1:].reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

  def torch_run() -> None:
    for i in range(steps):
      torch_step(torch_batches[i % len(torch_batches)])

  label = "torch.compile" if sizes.torch_compile else "torch eager"
  progress(f"compiling GPT-2 {layers}x{width} in jax and {label} ...")
  for _ in range(2):  # Compiles both (and tunes torch.compile's kernels) before the timing.
    fjt_run()
    _torch_synced(torch_run)()
  times = take_turns({"fjt": fjt_run, label: _torch_synced(torch_run)}, sizes.repeats)
  tokens = steps * batch * block
  rates = {name: tokens / seconds for name, seconds in times.items()}
  kind = runs_on()
  peak = bf16_peak_flops(kind) if jax.default_backend() == "gpu" else None
  what = (f"GPT-2 {layers} layers x {width} wide, {heads} heads, block {block}, vocab {vocab}, "
          f"batch {batch}, bfloat16 compute, float32 params and AdamW, clip 1.0, {kind}")
  attention = fjt.models.gpt.attention_implementation("auto", jnp.bfloat16, width // heads)
  rows = [Row("train_step_gpt2_124m_vs_torch", rates["fjt"], rates[label], "tokens/s", ">= 1.1",
              f"{what}; fjt attention {attention}; baseline Hugging Face GPT2LMHeadModel with "
              f"SDPA, bf16 autocast, fused AdamW, {label}; ms per step: fjt "
              f"{1e3 * times['fjt'] / steps:.1f}, {label} {1e3 * times[label] / steps:.1f}")]
  achieved = flops_per_token * rates["fjt"]
  if peak:
    rows.append(Row("train_step_gpt2_124m_mfu", achieved / 1e12, peak / 1e12, "TFLOP/s", ">= 0.45",
                    f"{what}; {flops_per_token / 1e9:.3f} GFLOP per token (6 N + 12 L C T); "
                    f"peak: dense bf16 of {kind}; {label} reaches "
                    f"{flops_per_token * rates[label] / peak:.2f}"))
  progress(", ".join(f"{r.name}: {r.ratio:.2f}" for r in rows))
  return rows


# --- Aggregation ---------------------------------------------------------------------------------


def model_tree(nbytes: int, seed: int, layers: int = 16, width: int = 1024) -> dict[str, Any]:
  """A float32 model of about ``nbytes`` as numpy arrays: ``layers`` Dense layers with kernel
  ``(rows, width)`` and bias ``(width,)``, values normal(0, 1) from ``seed``."""
  rows = max(1, nbytes // (layers * width * 4))
  rng = np.random.default_rng(seed)
  return {f"Dense_{i}": {"kernel": rng.standard_normal((rows, width), np.float32),
                         "bias": rng.standard_normal(width, np.float32)} for i in range(layers)}


def _tree_bytes(tree: PyTree) -> int:
  return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def _torch_loop_mean(state_dicts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """The seed's mean as a PyTorch user writes it over state_dicts."""
  n = len(state_dicts)
  return {key: sum(sd[key] for sd in state_dicts) / n for key in state_dicts[0]}


def aggregate_rows(sizes: Sizes, progress: Callable[[str], None] = print) -> list[Row]:
  """``aggregate_vs_memcpy`` and ``aggregate_vs_torch_loop``: GB/s (N inputs read, one output
  written) of ``fjt.aggregate.mean`` over ``sizes.models`` trees of ``sizes.model_bytes``."""
  from fjt import aggregate
  from fjt.tree import flatten

  torch = require_torch()
  torch.set_num_threads(cpu_threads())
  device = torch_device()
  hosts = [model_tree(sizes.model_bytes, seed) for seed in range(sizes.models)]
  trees = [jax.device_put(tree) for tree in hosts]
  # On a CPU the state_dicts share the numpy arrays' memory: the loop only reads them.
  state_dicts = [{k: torch.from_numpy(v).to(device) for k, v in flatten(tree).items()}
                 for tree in hosts]
  model_bytes = _tree_bytes(hosts[0])
  leaves = jax.tree.leaves(hosts[0])
  copy_tree = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))
  into = [np.empty_like(leaf) for leaf in leaves]

  def copy_into() -> None:
    for dst, src in zip(into, leaves):
      np.copyto(dst, src)

  read_all = jax.jit(lambda trees: [jnp.sum(x) for x in jax.tree.leaves(trees)])
  contenders = {
      "fjt mean": _blocked(lambda: aggregate.mean(trees)),
      "read inputs": _blocked(lambda: read_all(trees)),
      "torch loop": _torch_synced(lambda: _torch_loop_mean(state_dicts)),
      "copy jax": _blocked(lambda: copy_tree(trees[0])),
      "copy torch": _torch_synced(lambda: [t.clone() for t in state_dicts[0].values()]),
  }
  on_cpu = jax.default_backend() == "cpu"
  if on_cpu:  # Host copies are the memcpy of a CPU only.
    contenders["copy numpy"] = lambda: [np.copy(leaf) for leaf in leaves]
    contenders["copy into existing numpy"] = copy_into
  times = take_turns(contenders, sizes.repeats)
  moved = (sizes.models + 1) * model_bytes
  mean_rate = moved / times["fjt mean"] / 1e9
  copies = {k: 2 * model_bytes / times[k] / 1e9
            for k in ("copy numpy", "copy jax", "copy torch") if k in times}
  best = max(copies, key=copies.get)
  mb = model_bytes / MB
  notes = (f"mean of {sizes.models} float32 models of {mb:.0f} MB on {runs_on()}, (N + 1) x "
           f"model bytes per call; baseline: allocating copy of one model (read + write), best "
           "of " + ", ".join(f"{k.split()[1]} {v:.1f}" for k, v in copies.items()) +
           " GB/s; the mean allocates its output too")
  if on_cpu:
    into_rate = 2 * model_bytes / times["copy into existing numpy"] / 1e9
    notes += (f". A copy into an existing buffer (no page faults) runs at {into_rate:.1f} GB/s: "
              f"ratio {mean_rate / into_rate:.2f} against it")
  rows = [
      Row("aggregate_vs_memcpy", mean_rate, copies[best], "GB/s", ">= 0.9", notes),
      Row("aggregate_vs_torch_loop", mean_rate, moved / times["torch loop"] / 1e9, "GB/s", ">= 5",
          "baseline: {k: sum(sd[k] for sd in state_dicts) / N} over PyTorch state_dicts of the "
          f"same arrays; fjt {times['fjt mean']:.3f} s, PyTorch {times['torch loop']:.3f} s. "
          f"Roofline: only reading the N inputs (a jitted sum) takes {times['read inputs']:.3f} s "
          f"({sizes.models * model_bytes / times['read inputs'] / 1e9:.1f} GB/s), so no mean can "
          f"beat the loop by more than {times['torch loop'] / times['read inputs']:.1f}x here"),
  ]
  progress(f"{rows[0].name}, {rows[1].name}: {rows[0].ratio:.2f}, {rows[1].ratio:.2f}")
  return rows


def _rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
  # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork and exec, so a child
  # would report its parent's RSS (the benchmark process holds gigabytes by then).
  with open("/proc/self/status") as f:
    return int(re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def stream_average_memory(paths: Sequence[str], out: str) -> dict[str, int]:
  """Runs ``fjt.merge.average_checkpoints(paths, out)`` and returns ``{"before": RSS bytes
  before it, "peak": peak RSS bytes while it ran}``. Meant for a fresh process (``python -c``);
  Linux only (``/proc``): the peak (VmHWM) is reset to the current RSS first."""
  from fjt import merge

  jnp.zeros(1).block_until_ready()  # The backend is up before "before".
  gc.collect()
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # Resets VmHWM to the current RSS.
  before = _rss_bytes()
  merge.average_checkpoints(paths, out, progress=False)
  return {"before": before, "peak": _peak_rss_bytes()}


def stream_average_rows(sizes: Sizes, progress: Callable[[str], None] = print) -> list[Row]:
  """``stream_average_peak_rss_models``: peak memory added by averaging ``sizes.models``
  checkpoints on disk, in a fresh process, in units of one model."""
  from fjt import checkpoint

  with tempfile.TemporaryDirectory(prefix="fjt-bench-") as tmp:
    paths = []
    for seed in range(sizes.models):
      paths.append(os.path.join(tmp, f"model_{seed}"))
      checkpoint.save(paths[-1], {"params": model_tree(sizes.model_bytes, seed)})
    model_bytes = _tree_bytes(model_tree(sizes.model_bytes, 0))
    code = ("import json, sys; from fjt.bench import stream_average_memory; "
            "print(json.dumps(stream_average_memory(sys.argv[1:-1], sys.argv[-1])))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # On the CPU: the row is about host memory, which arrays on a GPU would not show in.
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code, *paths, os.path.join(tmp, "out")],
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
      raise RuntimeError(f"the averaging subprocess failed:\n{done.stderr[-2000:]}")
    memory = json.loads(done.stdout.strip().splitlines()[-1])
  added = (memory["peak"] - memory["before"]) / MB
  row = Row("stream_average_peak_rss_models", added, model_bytes / MB, "MB", "<= 3",
            f"fjt.merge.average_checkpoints of {sizes.models} checkpoints of {model_bytes / MB:.0f} "
            f"MB in a fresh process on the CPU: peak RSS (VmHWM) minus RSS before "
            f"({memory['before'] / MB:.0f} MB)")
  progress(f"{row.name}: {row.ratio:.2f}")
  return [row]


# --- Checkpoints ---------------------------------------------------------------------------------


def train_state(nbytes: int, seed: int = 0):
  """A ``TrainState`` of about ``nbytes``: params (half) and their SGD momentum (half), random."""
  import fjt

  params = jax.device_put(model_tree(nbytes // 2, seed))
  tx = fjt.create_optimizer({"name": "sgd", "learning_rate": 0.1, "momentum": 0.9}, 1)
  rng = np.random.default_rng(seed + 1)
  opt_state = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape, np.float32))
                           if a.ndim else a, tx.init(params))
  return fjt.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                        opt_state=opt_state, rng=jax.random.PRNGKey(seed))


def checkpoint_rows(sizes: Sizes, progress: Callable[[str], None] = print) -> list[Row]:
  """``ckpt_save_blocking_vs_torch_save``, ``ckpt_save_total_vs_torch_save``,
  ``ckpt_restore_vs_torch_load`` and ``ckpt_verify_vs_restore`` for a train state of
  ``sizes.state_bytes``."""
  import orbax.checkpoint as ocp

  from fjt import checkpoint
  from fjt.tree import flatten, to_nested_dict

  torch = require_torch()
  device = torch_device()
  state = train_state(sizes.state_bytes)
  nbytes = _tree_bytes(state)
  # torch.save of the same arrays, as a state_dict of tensors (copies: torch owns its memory),
  # on the same device as the state.
  state_dict = {k: torch.from_numpy(np.array(v)).to(device)
                for k, v in flatten(to_nested_dict(state)).items()}
  with tempfile.TemporaryDirectory(prefix="fjt-bench-") as tmp:
    torch_path = os.path.join(tmp, "state.pt")
    checkpointer = checkpoint.RunCheckpointer(os.path.join(tmp, "run"), max_to_keep=1)
    steps = iter(range(1, 10**6))

    def fjt_save() -> Phases:
      start = time.perf_counter()
      checkpointer.save(next(steps), state)
      blocking = time.perf_counter() - start
      checkpointer.wait_until_finished()
      return Phases({"fjt save blocking": blocking, "fjt save total": time.perf_counter() - start})

    def torch_save() -> Phases:
      start = time.perf_counter()
      torch.save(state_dict, torch_path)
      saved = time.perf_counter() - start
      with open(torch_path, "rb") as f:  # Orbax (TensorStore) syncs its files to disk.
        os.fsync(f.fileno())
      return Phases({"torch.save": saved, "torch.save + fsync": time.perf_counter() - start})

    def newest() -> str:
      return checkpoint.step_dirs(checkpointer.directory)[-1][1]

    def fjt_restore() -> None:
      jax.block_until_ready(checkpoint.load(newest(), state))

    def fjt_verify() -> None:  # The part of fjt_restore that checks sizes and CRC-32s.
      checkpoint.verify(newest())

    # Orbax alone, the floor under fjt's save and restore: a synchronous save of the same tree
    # with the same options, and a restore of every leaf onto the state's shardings.
    item = to_nested_dict(state)
    abstract = {p: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding)
                for p, a in flatten(item).items()}

    def orbax_save() -> Phases:
      path = os.path.join(tmp, f"orbax-{next(steps)}")
      start = time.perf_counter()
      with ocp.Checkpointer(checkpoint._handler()) as orbax:
        orbax.save(path, args=ocp.args.PyTreeSave(item))
      elapsed = time.perf_counter() - start
      shutil.rmtree(path)
      return Phases({"orbax save": elapsed})

    def orbax_restore() -> None:
      _, item_dir = checkpoint.resolve(newest())
      jax.block_until_ready(checkpoint._restore(newest(), item_dir, abstract))

    try:
      times = take_turns({"fjt save": fjt_save, "torch.save": torch_save,
                          "fjt restore": fjt_restore, "fjt verify": fjt_verify,
                          "torch.load": _torch_synced(lambda: torch.load(torch_path,
                                                                         map_location=device)),
                          "orbax save": orbax_save, "orbax restore": orbax_restore},
                         sizes.repeats)
    finally:
      checkpointer.close()
  mb = nbytes / MB
  rows = [
      Row("ckpt_save_blocking_vs_torch_save", times["fjt save blocking"], times["torch.save"], "s",
          "<= 0.1", f"RunCheckpointer.save of a {mb:.0f} MB TrainState on {runs_on()} returning "
          "(the training loop's pause) against torch.save of the same arrays there"),
      Row("ckpt_save_total_vs_torch_save", times["fjt save total"], times["torch.save"], "s",
          "<= 1.5", "until complete on disk: wait_until_finished, manifest (CRC-32 of every "
          "file) included. Orbax fsyncs every file, torch.save does not: torch.save + fsync "
          f"takes {times['torch.save + fsync']:.3f} s, ratio "
          f"{times['fjt save total'] / times['torch.save + fsync']:.2f} against it. Floor: a "
          f"synchronous Orbax save of the same tree with the same options alone takes "
          f"{times['orbax save']:.3f} s, {times['orbax save'] / times['torch.save']:.2f}x torch.save"),
      Row("ckpt_restore_vs_torch_load", times["fjt restore"], times["torch.load"], "s", "<= 1.5",
          "checkpoint.load(step, target) onto the state's arrays (key report included) against "
          "torch.load, the CRC-32 of every file checked first (ckpt_verify_vs_restore). Floor: "
          f"Orbax's restore of the same leaves alone takes {times['orbax restore']:.3f} s, "
          f"{times['orbax restore'] / times['torch.load']:.2f}x torch.load: it reads each array "
          "into a zero-filled numpy buffer, then device_put copies it, two passes where "
          "torch.load makes one"),
      Row("ckpt_verify_vs_restore", times["fjt verify"], times["fjt restore"], "s", "<= 0.5",
          "the integrity check every restore starts with (sizes and CRC-32s of every file "
          f"against the manifest, ranges on all {os.cpu_count()} CPUs) against the whole "
          "checkpoint.load it is part of"),
  ]
  progress(", ".join(f"{r.name}: {r.ratio:.2f}" for r in rows))
  return rows


# --- Sharded state -------------------------------------------------------------------------------

SHARDED_MESH = {"data": 2, "fsdp": 4}  # On 8 devices: simulated CPU ones if fewer are present.


def sharded_state_bytes(vocab: int, mesh_axes: Mapping[str, int] = SHARDED_MESH) -> dict[str, int]:
  """Creates the NNLM train state (AdamW) of ``configs/text_nnlm.py`` with ``vocab`` words sharded
  on a mesh of ``mesh_axes`` (``jax.jit`` with ``out_shardings``, as ``fjt.train.fit`` does) and
  returns ``{"per_device": bytes on the fullest device, "total": bytes of the state}``, from
  the arrays' own ``addressable_shards``. Needs the mesh's number of devices."""
  import fjt
  from fjt import sharding
  from fjt.state import create_train_state, state_shardings

  model = fjt.models.NNLM(vocab_size=vocab, embed_dim=300, hidden=512)
  tx = fjt.create_optimizer({"name": "adamw", "learning_rate": 1e-3, "weight_decay": 0.01}, 1)
  mesh = sharding.create_train_mesh(mesh_axes, {})
  example = jnp.zeros((1, 4), jnp.int32)
  layout = state_shardings(model, tx, example, mesh, fjt.config.RUN_DEFAULTS["sharding_rules"])
  state = jax.jit(create_train_state, static_argnums=(0, 1), out_shardings=layout)(
      model, tx, example, jax.random.PRNGKey(0))
  held = sharding.bytes_per_device(state)
  return {"per_device": max(held.values()), "total": sum(x.nbytes for x in jax.tree.leaves(state))}


def sharded_state_rows(sizes: Sizes, progress: Callable[[str], None] = print) -> list[Row]:
  """``sharded_state_bytes_per_device_vs_ideal``: bytes of the train state on one device of a
  data=2 x fsdp=4 mesh against the ideal ``total / 4``. In a process of its own with 8
  simulated CPU devices where this one has fewer than 8 devices."""
  devices = math.prod(SHARDED_MESH.values())
  if jax.device_count() == devices:
    measured, where = sharded_state_bytes(sizes.sharded_vocab), runs_on()
  else:
    code = ("import json, sys; from fjt import bench; "
            f"print(json.dumps(bench.sharded_state_bytes({sizes.sharded_vocab})))")
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(
                   __file__))), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True)
    measured, where = json.loads(done.stdout.splitlines()[-1]), f"{devices} simulated CPU devices"
  fsdp = SHARDED_MESH["fsdp"]
  row = Row("sharded_state_bytes_per_device_vs_ideal", measured["per_device"],
            measured["total"] / fsdp, "bytes", "<= 1.15",
            f"the NNLM train state of configs/text_nnlm.py (vocab {sizes.sharded_vocab}, AdamW, "
            f"{measured['total'] / MB:.1f} MB) created sharded on data=2 x fsdp=4 ({where}): "
            "bytes on the fullest device, from the arrays' addressable_shards, against total / 4")
  progress(f"{row.name}: {row.ratio:.3f}")
  return [row]


# --- All rows ------------------------------------------------------------------------------------

ROW_NAMES = ("train_step_mlp_vs_torch", "train_step_mlp_vs_peak", "train_step_cnn_vs_torch",
             "train_step_gpt_vs_torch",
             "aggregate_vs_memcpy", "aggregate_vs_torch_loop", "stream_average_peak_rss_models",
             "ckpt_save_blocking_vs_torch_save", "ckpt_save_total_vs_torch_save",
             "ckpt_restore_vs_torch_load", "ckpt_verify_vs_restore",
             "sharded_state_bytes_per_device_vs_ideal")


# On a GPU, after the train steps' rows (``gpt2_124m_rows``).
GPU_ROW_NAMES = ("train_step_gpt2_124m_vs_torch", "train_step_gpt2_124m_mfu")
GROUPS = ("train", "gpt2", "aggregate", "stream", "checkpoint", "sharded")


def run(sizes: Sizes = FULL, cnn_config=None, progress: Callable[[str], None] = print,
        only: Sequence[str] | None = None) -> list[Row]:
  """Every benchmark, in the order of ``ROW_NAMES`` (the CNN row needs ``cnn_config``, the
  digits CNN experiment config; with ``sizes.gpt2``, ``GPU_ROW_NAMES`` follow the train steps'
  rows), or those of the ``GROUPS`` named in ``only``. Sets both
  libraries to full float32 matmuls first (``full_float32``), for the rest of the process."""
  unknown = sorted(set(only or ()) - set(GROUPS))
  if unknown:
    raise ValueError(f"unknown benchmark groups {unknown}: expected some of {list(GROUPS)}")
  require_torch()
  full_float32()
  rows = []
  groups = {"train": ("train steps", lambda: train_step_rows(sizes, cnn_config, progress)
                                      + gpt_train_step_row(sizes, progress)),
            "gpt2": ("GPT-2 124M", lambda: gpt2_124m_rows(sizes, progress) if sizes.gpt2 else []),
            "aggregate": ("aggregation", lambda: aggregate_rows(sizes, progress)),
            "stream": ("streaming average", lambda: stream_average_rows(sizes, progress)),
            "checkpoint": ("checkpoints", lambda: checkpoint_rows(sizes, progress)),
            "sharded": ("sharded state", lambda: sharded_state_rows(sizes, progress))}
  chosen = [groups[key] for key in GROUPS if not only or key in only]
  start = time.perf_counter()
  for number, (name, group) in enumerate(chosen, 1):
    progress(f"[{number}/{len(chosen)}] measuring {name} ...")  # Each group takes minutes.
    rows.extend(group())
    gc.collect()
    progress(f"  ({time.perf_counter() - start:.0f} s so far)")
  return rows


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
