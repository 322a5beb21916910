"""Llama: the decoder of Hugging Face's ``LlamaForCausalLM``, with its parameter names.

``params`` of ``Llama`` mirror ``LlamaForCausalLM.state_dict()`` name by name (``.`` -> ``/``,
``layers.{i}`` -> ``layers_{i}``, torch ``weight`` (out, in) -> Linen ``kernel`` (in, out)):

  model/embed_tokens/embedding (V, C)                    model.embed_tokens.weight
  model/layers_{i}/input_layernorm/scale (C,)            model.layers.{i}.input_layernorm.weight
  model/layers_{i}/self_attn/q_proj/kernel (C, H*D)      model.layers.{i}.self_attn.q_proj.weight
  model/layers_{i}/self_attn/{k,v}_proj/kernel (C, K*D)  ... k_proj, v_proj (K key/value heads)
  model/layers_{i}/self_attn/o_proj/kernel (H*D, C)      ... o_proj
  model/layers_{i}/post_attention_layernorm/scale (C,)
  model/layers_{i}/mlp/{gate,up}_proj/kernel (C, F), mlp/down_proj/kernel (F, C)
  model/norm/scale (C,)                                   model.norm.weight
  lm_head/kernel (C, V)                                   lm_head.weight (absent when tied)

Logical axes for ``fjt.sharding`` as GPT's: embeddings (vocab, embed), q/k/v (embed, heads)
and o_proj (heads, embed), gate/up (embed, mlp) and down (mlp, embed), lm_head (embed, vocab),
norms (norm,). ``fjt.interop.llama`` converts Hugging Face configs and state_dicts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fjt.models.gpt import attention_implementation
from fjt.models.transformer import block_class, causal_attention

Dtype = Any

_INIT_STD = 0.02  # Llama's initializer_range.


def _normal(axes: tuple[str | None, ...]) -> nn.initializers.Initializer:
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=_INIT_STD), axes)


def _dense(features: int, axes: tuple[str, str], dtype: Dtype, param_dtype: Dtype,
           name: str) -> nn.Dense:
  """A bias-free projection (Llama has no biases), kernel N(0, 0.02) with logical ``axes``."""
  return nn.Dense(features, use_bias=False, kernel_init=_normal(axes), dtype=dtype,
                  param_dtype=param_dtype, name=name)


def _rms_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.RMSNorm:
  """``x / sqrt(mean(x^2) + eps) * scale``, the statistics in float32 (as HF's LlamaRMSNorm)."""
  return nn.RMSNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
                    scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)))


def rotate_half(x: jax.Array) -> jax.Array:
  """``[x1, x2] -> [-x2, x1]`` on the last axis (HF's ``rotate_half``)."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding of ``x`` ``(B, T, heads, D)`` at int ``positions`` ``(T,)``.

  ``x cos + rotate_half(x) sin`` with angles ``position * theta^(-2j / D)`` for ``j < D/2``,
  repeated once over the two halves of ``D`` (HF's convention; Meta's original interleaves
  pairs instead). The angles are float32; cos and sin are cast to ``x``'s dtype.
  """
  dim = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
  angles = jnp.concatenate([angles, angles], axis=-1)[None, :, None, :]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  return x * cos + rotate_half(x) * sin


class LlamaAttention(nn.Module):
  """Grouped-query causal self-attention with rotary positions; no biases."""
  num_heads: int
  num_kv_heads: int
  block_size: int
  rope_theta: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  decode: bool = False
  attention: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, cache_index: jax.Array | None = None) -> jax.Array:
    batch, length, width = x.shape
    head_dim = width // self.num_heads
    dense = lambda features, axes, name: _dense(features, axes, self.dtype, self.param_dtype, name)
    heads = lambda t, n: t.reshape(batch, length, n, head_dim)
    q = heads(dense(self.num_heads * head_dim, ("embed", "heads"), "q_proj")(x), self.num_heads)
    k = heads(dense(self.num_kv_heads * head_dim, ("embed", "heads"), "k_proj")(x), self.num_kv_heads)
    v = heads(dense(self.num_kv_heads * head_dim, ("embed", "heads"), "v_proj")(x), self.num_kv_heads)
    positions = jnp.arange(length) if cache_index is None else cache_index + jnp.arange(length)
    q, k = apply_rotary(q, positions, self.rope_theta), apply_rotary(k, positions, self.rope_theta)
    y = causal_attention(self, q, k, v, block_size=self.block_size, decode=self.decode,
                         cache_index=cache_index,
                         implementation=attention_implementation(self.attention, q.dtype, head_dim))
    return dense(width, ("heads", "embed"), "o_proj")(y.reshape(batch, length, -1))


class LlamaMLP(nn.Module):
  """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``, hidden width ``mlp_dim``."""
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = lambda features, axes, name: _dense(features, axes, self.dtype, self.param_dtype, name)
    gate = dense(self.mlp_dim, ("embed", "mlp"), "gate_proj")(x)
    up = dense(self.mlp_dim, ("embed", "mlp"), "up_proj")(x)
    return dense(x.shape[-1], ("mlp", "embed"), "down_proj")(nn.silu(gate) * up)


class LlamaBlock(nn.Module):
  """``x + attn(rms(x))``, then ``x + mlp(rms(x))`` (HF's ``LlamaDecoderLayer``)."""
  num_heads: int
  num_kv_heads: int
  mlp_dim: int
  block_size: int
  rope_theta: float
  rms_norm_eps: float
  dropout_rate: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  decode: bool = False
  attention: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, cache_index: jax.Array | None = None) -> jax.Array:
    norm = lambda name: _rms_norm(self.rms_norm_eps, self.dtype, self.param_dtype, name)
    drop = nn.Dropout(self.dropout_rate, deterministic=not train)
    y = LlamaAttention(self.num_heads, self.num_kv_heads, self.block_size, self.rope_theta,
                       self.dtype, self.param_dtype, self.decode, self.attention,
                       name="self_attn")(norm("input_layernorm")(x), cache_index)
    x = x + drop(y)
    y = LlamaMLP(self.mlp_dim, self.dtype, self.param_dtype, name="mlp")(
        norm("post_attention_layernorm")(x))
    return x + drop(y)


class LlamaModel(nn.Module):
  """HF's ``LlamaModel``: embedding, blocks, final RMSNorm -> hidden states ``(B, T, C)``.
  ``block(name=...)`` makes one ``LlamaBlock`` (rematerialised or not)."""
  vocab_size: int
  embed_dim: int
  num_layers: int
  rms_norm_eps: float
  dropout_rate: float
  block: Callable[..., nn.Module]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  decode: bool = False

  def setup(self):
    self.embed_tokens = nn.Embed(self.vocab_size, self.embed_dim,
                                 embedding_init=_normal(("vocab", "embed")), dtype=self.dtype,
                                 param_dtype=self.param_dtype)
    self.layers = [self.block() for _ in range(self.num_layers)]  # layers_0, layers_1, ...
    self.norm = _rms_norm(self.rms_norm_eps, self.dtype, self.param_dtype, None)
    self.dropout = nn.Dropout(self.dropout_rate)
    if self.decode:
      self.cache_index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    cache_index = None
    if self.decode:
      cache_index = self.cache_index.value
      if not self.is_initializing():
        self.cache_index.value = cache_index + x.shape[1]
    h = self.dropout(self.embed_tokens(x), deterministic=not train)
    for layer in self.layers:
      h = layer(h, train, cache_index)
    return self.norm(h)


class Llama(nn.Module):
  """Llama language model: int32 token ids ``(B, T)`` -> float32 logits ``(B, T, vocab_size)``.

  ``h = embed_tokens[x]``, ``num_layers`` pre-RMSNorm blocks (grouped-query attention with
  rotary positions, SwiGLU MLP, no biases), a final RMSNorm, and logits ``h @ lm_head`` (or
  ``h @ embed_tokens^T`` when tied), exactly as Hugging Face's ``LlamaForCausalLM``.
  Initialisation is Llama's: N(0, 0.02) for every kernel and embedding, norms one.

  Attributes:
    vocab_size: rows of the embedding (and columns of the head).
    block_size: the longest sequence (HF's ``max_position_embeddings``), the cache's length.
    num_layers, num_heads, embed_dim: depth, query heads, width ``C`` (head width ``C / heads``).
    num_kv_heads: key/value heads, dividing ``num_heads`` (0: ``num_heads``, no grouping).
    mlp_dim: the SwiGLU hidden width (HF's ``intermediate_size``).
    rope_theta, rms_norm_eps: the rotary base and RMSNorm's epsilon.
    tie_embeddings: the head is ``embed_tokens`` (HF's ``tie_word_embeddings``).
    dropout_rate: dropout on the embeddings and each residual branch (not in HF's Llama,
      which has none; 0 gives its numbers).
    dtype, param_dtype, decode, attention, remat: as ``GPT``'s (compute dtype, with norm
      statistics and logits float32; parameter dtype; key/value cache decoding, the cache
      ``(B, block_size, num_kv_heads, head_dim)``; the attention kernel; ``nn.remat`` per block).
  """
  vocab_size: int = 32000
  block_size: int = 2048
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 0
  embed_dim: int = 256
  mlp_dim: int = 688
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  tie_embeddings: bool = False
  dropout_rate: float = 0.0
  dtype: Dtype = "float32"
  param_dtype: Dtype = "float32"
  decode: bool = False
  attention: str = "auto"
  remat: str = "none"

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.embed_dim % self.num_heads or self.num_heads % self.kv_heads:
      raise ValueError(f"Llama: embed_dim {self.embed_dim} must be a multiple of num_heads "
                       f"{self.num_heads}, and num_heads of num_kv_heads {self.kv_heads}")
    if (self.embed_dim // self.num_heads) % 2:
      raise ValueError(f"Llama: the head width {self.embed_dim // self.num_heads} must be even "
                       "(rotary embeddings rotate pairs)")
    if x.shape[1] > self.block_size:
      raise ValueError(f"Llama: sequence length {x.shape[1]} exceeds block_size {self.block_size}")
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    block = functools.partial(
        block_class(LlamaBlock, self.remat, self.decode), self.num_heads, self.kv_heads,
        self.mlp_dim, self.block_size, self.rope_theta, self.rms_norm_eps, self.dropout_rate,
        dtype, param_dtype, self.decode, self.attention)
    model = LlamaModel(self.vocab_size, self.embed_dim, self.num_layers, self.rms_norm_eps,
                       self.dropout_rate, block, dtype, param_dtype, self.decode, name="model")
    h = model(x, train)
    if self.tie_embeddings:
      return model.embed_tokens.attend(h).astype(jnp.float32)
    head = _dense(self.vocab_size, ("embed", "vocab"), dtype, param_dtype, "lm_head")
    return head(h).astype(jnp.float32)
