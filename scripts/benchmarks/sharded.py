"""The sharded-state row: bytes of a train state on one device of a data x fsdp mesh against the
ideal, from the arrays' own ``addressable_shards``."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from benchmarks.machine import in_fresh_process, runs_on
from benchmarks.rows import MB, Row, Sizes


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
    measured = in_fresh_process(
        "benchmarks.sharded.sharded_state_bytes", [sizes.sharded_vocab],
        {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"})
    where = f"{devices} simulated CPU devices"
  fsdp = SHARDED_MESH["fsdp"]
  row = Row("sharded_state_bytes_per_device_vs_ideal", measured["per_device"],
            measured["total"] / fsdp, "bytes", "<= 1.15",
            f"the NNLM train state of configs/text_nnlm.py (vocab {sizes.sharded_vocab}, AdamW, "
            f"{measured['total'] / MB:.1f} MB) created sharded on data=2 x fsdp=4 ({where}): "
            "bytes on the fullest device, from the arrays' addressable_shards, against total / 4")
  progress(f"{row.name}: {row.ratio:.3f}")
  return [row]
