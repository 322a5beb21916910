"""The rematerialisation rows: the memory of a GPT train step with ``model.remat`` "blocks"
against the same step without it, as XLA's compiled memory analysis counts it and as the
residuals JAX's autodiff keeps for the backward pass.

XLA's CPU compiler drops the optimisation barriers that ``jax.checkpoint`` puts around the
recomputation and common-subexpression elimination merges it back into the forward pass, so on
a CPU the compiled step keeps every activation whatever ``remat`` says (ratio about 1.0);
GPU and TPU compilers keep the barriers. The residual bytes are the compiler-independent count.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from benchmarks.machine import runs_on
from benchmarks.rows import Row, Sizes


def train_step_temp_bytes(model, batch: int, block: int, vocab: int) -> int:
  """``temp_size_in_bytes`` of XLA's compiled memory analysis of ``fjt.make_train_step`` of
  ``model`` (AdamW, language model) on a batch ``(batch, block)``: the activations and other
  scratch buffers of one step, params and optimizer state not included. Compiles, runs nothing."""
  import fjt

  tx = fjt.create_optimizer({"name": "adamw", "learning_rate": 1e-4, "weight_decay": 0.1,
                             "decay_mask": "gpt"}, 1)
  x = jax.ShapeDtypeStruct((batch, block), jnp.int32)
  state = jax.eval_shape(lambda: fjt.create_train_state(
      model, tx, jnp.zeros((1, block), jnp.int32), jax.random.PRNGKey(0), rng_streams=("dropout",)))
  step = fjt.make_train_step(model, tx, "language_model")
  compiled = step.lower(state, {"x": x, "y": x}).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def residual_bytes(model, batch: int, block: int) -> int:
  """Bytes of the residuals ``jax.vjp`` of the model's forward pass (train mode, dropout on)
  keeps for the backward pass: the activations saved between forward and backward, params
  included. Shapes only; nothing is computed."""
  from fjt.tree import unbox

  x = jax.ShapeDtypeStruct((batch, block), jnp.int32)
  params = jax.eval_shape(lambda: unbox(model.init(jax.random.PRNGKey(0),
                                                   jnp.zeros((1, block), jnp.int32)))["params"])
  forward = lambda p, x: model.apply({"params": p}, x, train=True,
                                     rngs={"dropout": jax.random.PRNGKey(0)}).sum()
  saved = jax.eval_shape(lambda p, x: jax.vjp(lambda q: forward(q, x), p)[1], params, x)
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(saved))


def remat_rows(sizes: Sizes, progress: Callable[[str], None] = print) -> list[Row]:
  """``gpt_remat_temp_bytes_vs_plain``: ``train_step_temp_bytes`` of a GPT (``sizes.remat_gpt``:
  layers, width, heads, block, batch; vocabulary 5,000; dropout 0.1) with ``remat="blocks"``
  over the same GPT with ``remat="none"``; ``gpt_remat_residual_bytes_vs_plain``: likewise
  ``residual_bytes``."""
  import fjt

  layers, width, heads, block, batch = sizes.remat_gpt
  vocab = 5000
  temp, saved = {}, {}
  for remat in ("none", "blocks"):
    model = fjt.models.GPT(vocab_size=vocab, block_size=block, num_layers=layers,
                           num_heads=heads, embed_dim=width, dropout_rate=0.1, remat=remat)
    temp[remat] = train_step_temp_bytes(model, batch, block, vocab)
    saved[remat] = residual_bytes(model, batch, block)
  what = (f"GPT {layers} layers x {width} wide, {heads} heads, block {block}, batch {batch}, "
          f"vocab {vocab}, dropout 0.1, model.remat 'blocks' over 'none', {runs_on()}")
  rows = [Row("gpt_remat_temp_bytes_vs_plain", temp["blocks"], temp["none"], "bytes", "<= 0.5",
              "XLA memory_analysis().temp_size_in_bytes of the compiled train step (AdamW) of a "
              + what + (" (XLA's CPU compiler undoes remat: see benchmarks/remat.py)"
                        if jax.default_backend() == "cpu" else "")),
          Row("gpt_remat_residual_bytes_vs_plain", saved["blocks"], saved["none"], "bytes",
              "<= 0.5", "bytes of the residuals jax.vjp of the forward pass keeps for the "
              "backward pass, params included, of a " + what)]
  for row in rows:
    progress(f"{row.name}: {row.ratio:.2f}")
  return rows
