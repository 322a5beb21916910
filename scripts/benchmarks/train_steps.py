"""The train-step rows: samples/s of ``fjt.make_train_step`` on an MLP and the digits CNN against
the same model and optimizer in PyTorch, and against a float32 matmul peak; and the fjt and
PyTorch step loops that the GPT rows (``benchmarks.gpt``) time too."""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.machine import cpu_threads, require_torch, runs_on, torch_device
from benchmarks.rows import PyTree, Row, Sizes
from benchmarks.timing import take_turns, torch_synced


def fjt_loop(model, tx, task, batches: Sequence[dict[str, jax.Array]], steps: int,
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
  """``fjt_loop`` of SGD (momentum 0.9) classification steps over the batches ``x[i], y[i]``."""
  import fjt

  tx = fjt.create_optimizer({"name": "sgd", "learning_rate": learning_rate, "momentum": 0.9}, 1)
  batches = [{"x": jax.device_put(xb), "y": jax.device_put(yb)} for xb, yb in zip(x, y)]
  return fjt_loop(model, tx, "classification", batches, steps)


def torch_loops(make_step: Callable[[], Callable[..., Any]],
                batches: Sequence[tuple[Any, ...]], steps: int, compile_: bool
                ) -> tuple[dict[str, Callable[[], None]], list[str]]:
  """``{"torch eager": run, "torch.compile": run}``: ``run()`` does ``steps`` calls of a step
  from ``make_step()`` (a fresh model and optimizer for each contender) over ``batches`` (the
  step's arguments) in turn; the compiled one only with ``compile_`` and if compiling works here.
  Also notes on what was not tried or failed."""
  torch = require_torch()

  def make(compiled: bool) -> Callable[[], None]:
    step = make_step()
    if compiled:
      step = torch.compile(step)
      for args in batches[:2]:  # Compiles now, so failures show here.
        step(*args)

    def run() -> None:
      for i in range(steps):
        step(*batches[i % len(batches)])

    return torch_synced(run)

  loops, notes = {"torch eager": make(False)}, []
  if compile_:
    try:
      loops["torch.compile"] = make(True)
    except Exception as e:  # Inductor needs a C++ toolchain; any failure leaves eager alone.
      notes.append(f"torch.compile failed here ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
  else:
    notes.append("torch.compile not tried (quick mode)")
  return loops, notes


def _torch_train_loops(model, x: np.ndarray, y: np.ndarray, steps: int, learning_rate: float,
                       compile_: bool) -> tuple[dict[str, Callable[[], None]], list[str]]:
  """``torch_loops`` of the PyTorch twin of ``model`` with SGD (momentum 0.9) over the batches
  ``x[i], y[i]``."""
  torch = require_torch()
  from fjt.interop.torch_models import torch_module
  device = torch_device()
  nchw = x.ndim == 5  # (batches, B, H, W, C) images: PyTorch convolutions take NCHW.
  batches = [(torch.from_numpy(np.ascontiguousarray(xb.transpose(0, 3, 1, 2) if nchw else xb)
                               ).to(device), torch.from_numpy(yb.astype(np.int64)).to(device))
             for xb, yb in zip(x, y)]

  def make_step() -> Callable[..., Any]:
    module = torch_module(model, x.shape[2:]).to(device)
    module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=learning_rate, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(xb, yb):
      optimizer.zero_grad(set_to_none=True)
      loss = loss_fn(module(xb), yb)
      loss.backward()
      optimizer.step()
      return loss

    return step

  return torch_loops(make_step, batches, steps, compile_)


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

  contenders = {"matmul jax": jax_mm, "matmul torch": torch_synced(torch_mm)}
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
      "matmuls torch": torch_synced(loop(
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
