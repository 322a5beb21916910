"""The LoRA row: optimizer-state bytes of a LoRA fine-tune against a full one, at GPT-2 124M's
shapes, from ``jax.eval_shape`` (nothing allocated)."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax

from benchmarks.rows import MB, Row, Sizes

# GPT-2 124M: vocabulary 50,257, 1,024 positions, 12 layers of 768 with 12 heads.
GPT2_124M = {"vocab_size": 50257, "block_size": 1024, "num_layers": 12, "num_heads": 12,
             "embed_dim": 768}
RANK = 8
TARGETS = (r"(attn|mlp)/c_\w+/kernel",)  # Every attention and MLP kernel: c_attn, c_proj, c_fc.


def opt_state_bytes(rank: int) -> dict[str, int]:
  """``{"opt_state": bytes, "trained": parameters}`` of the AdamW train state of GPT-2 124M as
  ``fjt.state.create_train_state`` makes it, with LoRA adapters of ``rank`` on ``TARGETS``
  (``rank`` 0: a full fine-tune), from shapes alone."""
  import jax.numpy as jnp

  import fjt
  from fjt.options import LoraOptions
  from fjt.state import create_train_state

  model = fjt.models.GPT(**GPT2_124M, dropout_rate=0.0)
  tx = fjt.create_optimizer({"name": "adamw", "learning_rate": 1e-4, "weight_decay": 0.1,
                             "decay_mask": "gpt"}, 1)
  lora = LoraOptions(rank=rank, alpha=16.0, targets=TARGETS) if rank else None
  example = jax.ShapeDtypeStruct((1, GPT2_124M["block_size"]), jnp.int32)
  state = jax.eval_shape(lambda rng: create_train_state(model, tx, example, rng, lora=lora),
                         jax.random.PRNGKey(0))
  size = lambda tree: sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))
  return {"opt_state": size(state.opt_state),
          "trained": sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))}


def lora_rows(sizes: Sizes, progress: Callable[[str], None] = print) -> list[Row]:
  """``lora_opt_state_bytes_vs_full``: AdamW's state of rank-8 adapters on every attention and
  MLP kernel of GPT-2 124M against AdamW's state of all its parameters (the same at every size:
  shapes only)."""
  del sizes
  lora, full = opt_state_bytes(RANK), opt_state_bytes(0)
  row = Row("lora_opt_state_bytes_vs_full", lora["opt_state"], full["opt_state"], "bytes",
            "<= 0.05",
            f"AdamW state of GPT-2 124M's shapes (jax.eval_shape): rank-{RANK} LoRA on c_attn, "
            f"c_proj and c_fc of 12 layers ({lora['trained']:,} trained values, "
            f"{lora['opt_state'] / MB:.1f} MB) against a full fine-tune ({full['trained']:,}, "
            f"{full['opt_state'] / MB:.1f} MB)")
  progress(f"{row.name}: {row.ratio:.4f}")
  return [row]
