"""The GPT rows: tokens/s of a small ``fjt.GPT`` against Hugging Face's ``GPT2LMHeadModel``, and
GPT-2 124M in bfloat16 on a GPU against the nanoGPT recipe in PyTorch, with its MFU."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.machine import cpu_threads, require_torch, runs_on, torch_device
from benchmarks.rows import PyTree, Row, Sizes
from benchmarks.timing import take_turns, torch_synced
from benchmarks.train_steps import fjt_loop, torch_loops


def hf_gpt2(vocab: int, block: int, width: int, layers: int, heads: int, device,
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
  fjt_run, _ = fjt_loop(model, tx, "language_model", batches, steps)
  device = torch_device()
  torch_batches = [torch.from_numpy(b.astype(np.int64)).to(device) for b in x]

  def make_step() -> Callable[..., Any]:
    module, optimizer = hf_gpt2(vocab, block, width, layers, heads, device, 1e-4)

    def step(b):
      optimizer.zero_grad(set_to_none=True)
      logits = module(b[:, :-1]).logits
      loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), b[:, 1:].reshape(-1))
      loss.backward()
      optimizer.step()
      return loss

    return step

  torch_runs, notes = torch_loops(make_step, [(b,) for b in torch_batches], steps,
                                  sizes.torch_compile)
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
  fjt_run, params = fjt_loop(model, tx, "language_model", batches, steps, precision="default")
  flops_per_token = gpt_flops_per_token(params, layers, width, block)
  device = torch_device()
  module, optimizer = hf_gpt2(vocab, block, width, layers, heads, device, 6e-4,
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
    torch_synced(torch_run)()
  times = take_turns({"fjt": fjt_run, label: torch_synced(torch_run)}, sizes.repeats)
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
