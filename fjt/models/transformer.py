"""What the decoder-only transformers (``GPT``, ``Llama``) share: causal attention with a
key/value cache, the zero cache of a model, and rematerialisation of their blocks."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

REMAT = ("none", "blocks")


def causal_attention(module: nn.Module, q: jax.Array, k: jax.Array, v: jax.Array, *,
                     block_size: int, decode: bool, cache_index: jax.Array | None,
                     implementation: str) -> jax.Array:
  """``softmax(q k^T / sqrt(head_dim) + causal mask) v``: ``(B, T, heads, head_dim)``.

  ``q`` is ``(B, T, heads, head_dim)``; ``k`` and ``v`` are ``(B, T, kv_heads, head_dim)`` with
  ``kv_heads`` dividing ``heads`` (grouped-query attention: query head ``h`` reads key/value
  head ``h // (heads / kv_heads)``, as Hugging Face's ``repeat_kv``).

  With ``decode``, ``k`` and ``v`` are written into ``module``'s ``"cache"`` collection
  (``cached_key`` / ``cached_value``, ``(B, block_size, kv_heads, head_dim)``) at position
  ``cache_index``, and each query attends to every cached position up to its own, so a prompt
  is fed at once and then one token per call. Decoding uses XLA's attention; otherwise
  ``implementation`` (``"xla"`` or ``"cudnn"``) is passed to ``jax.nn.dot_product_attention``.
  """
  if not decode:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
  batch, length = q.shape[:2]
  shape = (batch, block_size) + k.shape[2:]
  cached_k = module.variable("cache", "cached_key", jnp.zeros, shape, k.dtype)
  cached_v = module.variable("cache", "cached_value", jnp.zeros, shape, v.dtype)
  if not module.is_initializing():
    start = (0, cache_index, 0, 0)
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k.astype(cached_k.value.dtype), start)
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v.astype(cached_v.value.dtype), start)
  k, v = cached_k.value.astype(q.dtype), cached_v.value.astype(q.dtype)
  # Query t sits at absolute position cache_index + t and sees keys 0 .. cache_index + t.
  query_pos = cache_index + jnp.arange(length)
  mask = jnp.arange(block_size)[None, :] <= query_pos[:, None]
  return jax.nn.dot_product_attention(q, k, v, mask=mask[None, None])


def init_cache(model: nn.Module, batch_size: int) -> dict[str, Any]:
  """The zero ``"cache"`` collection of ``model.clone(decode=True)`` for ``batch_size`` rows:
  per block ``cached_key``/``cached_value`` ``(B, block_size, kv_heads, head_dim)`` in the
  compute dtype, and ``cache_index`` int32 ``()``. Nothing but shapes is computed."""
  decoder = model.clone(decode=True)
  shapes = jax.eval_shape(lambda: decoder.init(jax.random.PRNGKey(0),
                                               jnp.zeros((batch_size, 1), jnp.int32)))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


def block_class(cls: type[nn.Module], remat: str, decode: bool = False) -> type[nn.Module]:
  """``cls`` itself for ``remat="none"``; for ``"blocks"``, ``nn.remat(cls)``: each block keeps
  only its input for the backward pass and recomputes its activations there (less memory, one
  more forward pass of the blocks per step; the same numbers). ``cls.__call__`` takes
  ``(x, train, cache_index)``, ``train`` a Python bool. Decoding never rematerialises."""
  if remat not in REMAT:
    raise ValueError(f"model.remat: expected one of {REMAT}, got {remat!r}")
  if remat == "none" or decode:
    return cls
  return nn.remat(cls, static_argnums=(2,))  # self is argument 0: ``train`` is 2.
