"""GPT-2: a decoder-only transformer whose parameter names are those of Hugging Face's GPT-2.

``params`` of ``GPT`` mirror ``GPT2LMHeadModel.state_dict()`` name by name:

  wte/embedding (V, C)            transformer.wte.weight (also the tied LM head)
  wpe/embedding (block_size, C)   transformer.wpe.weight
  h_{i}/ln_1/{scale,bias} (C,)    transformer.h.{i}.ln_1.{weight,bias}
  h_{i}/attn/c_attn/kernel (C,3C) transformer.h.{i}.attn.c_attn.weight (Conv1D: already (in, out))
  h_{i}/attn/c_proj/kernel (C,C)  transformer.h.{i}.attn.c_proj.weight
  h_{i}/ln_2, h_{i}/mlp/c_fc (C,4C), h_{i}/mlp/c_proj (4C,C), ln_f   likewise

Parameters carry logical axis names (``nn.with_logical_partitioning``) that
``config.sharding_rules`` maps to mesh axes (``fjt.sharding``): ``wte`` (vocab, embed), ``wpe``
(None, embed), ``c_attn`` (embed, heads) and ``attn/c_proj`` (heads, embed), ``c_fc`` (embed, mlp)
and ``mlp/c_proj`` (mlp, embed): Megatron's column then row split over ``model``; LayerNorms
(norm,). ``model.init`` returns them boxed; ``fjt.init_variables`` unboxes.

Decoding uses a key/value cache in the ``"cache"`` collection (``decode=True``), as flax's
``examples/lm1b`` does; ``fjt.generate`` runs it in one jitted loop.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fjt import accelerators
from fjt.models.transformer import block_class, causal_attention, init_cache

Dtype = Any

_LN_EPS = 1e-5  # GPT-2's layer_norm_epsilon.
_INIT_STD = 0.02  # GPT-2's initializer_range.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def attention_implementation(choice: str, dtype: Dtype, head_dim: int) -> str:
  """The ``implementation`` of ``jax.nn.dot_product_attention`` that ``choice`` means.

  ``"xla"`` and ``"cudnn"`` are themselves; ``"auto"`` is ``"cudnn"`` (the fused flash-attention
  kernel, about twice as fast as XLA's attention for GPT-2 small on an H100) where it runs: a GPU,
  a bfloat16 or float16 compute dtype, a head width that is a multiple of 8 up to 128, and no
  ``--xla_gpu_deterministic_ops`` (``config.deterministic``: with jax 0.11.2 on an H100, a train
  step with the cuDNN kernel failed to run under that flag); else ``"xla"`` (JAX's own default,
  whatever the platform)."""
  if choice not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"GPT: attention {choice!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
  if choice != "auto":
    return choice
  fused = (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
           and head_dim % 8 == 0 and head_dim <= 128 and not accelerators.deterministic_ops())
  return "cudnn" if fused else "xla"


def _normal(std: float, axes: tuple[str | None, ...]) -> nn.initializers.Initializer:
  """N(0, std), the parameter's dimensions named ``axes`` for ``fjt.sharding``'s rules."""
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


def _zeros(axes: tuple[str | None, ...]) -> nn.initializers.Initializer:
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _layer_norm(dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=_LN_EPS, dtype=dtype, param_dtype=param_dtype, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                      bias_init=_zeros(("norm",)))


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention with a fused q/k/v projection.

  Input ``(B, T, C)``; ``c_attn`` maps it to ``(B, T, 3C)`` = [q | k | v] (HF's order), each
  split into ``num_heads`` heads of ``C / num_heads``; attention is
  ``softmax(q k^T / sqrt(head_dim) + causal mask) v`` by ``jax.nn.dot_product_attention``
  (``attention_implementation``: cuDNN's fused kernel where the platform and dtype allow);
  ``c_proj`` maps back to ``C``.

  With ``decode=True``, keys and values are written into a cache ``(B, block_size, heads,
  head_dim)`` at position ``cache_index`` and the queries attend to every cached position up to
  their own, so a prompt can be fed at once and then one token per call.
  """
  num_heads: int
  block_size: int
  residual_std: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  decode: bool = False
  attention: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, cache_index: jax.Array | None = None) -> jax.Array:
    batch, length, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"GPT: embed_dim {width} is not a multiple of num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    dense = lambda features, std, axes, name: nn.Dense(
        features, kernel_init=_normal(std, axes), bias_init=_zeros(axes[1:]), dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name)
    qkv = dense(3 * width, _INIT_STD, ("embed", "heads"), "c_attn")(x)  # Column split.
    q, k, v = (t.reshape(batch, length, self.num_heads, head_dim) for t in jnp.split(qkv, 3, -1))
    y = causal_attention(self, q, k, v, block_size=self.block_size, decode=self.decode,
                         cache_index=cache_index,
                         implementation=attention_implementation(self.attention, q.dtype, head_dim))
    return dense(width, self.residual_std, ("heads", "embed"), "c_proj")(  # Row split.
        y.reshape(batch, length, width))


class MLP(nn.Module):
  """``c_proj(gelu_tanh(c_fc(x)))`` with a hidden width of ``4 * C``."""
  residual_std: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    x = nn.Dense(4 * width, kernel_init=_normal(_INIT_STD, ("embed", "mlp")),
                 bias_init=_zeros(("mlp",)), dtype=self.dtype,
                 param_dtype=self.param_dtype, name="c_fc")(x)
    x = nn.gelu(x, approximate=True)
    return nn.Dense(width, kernel_init=_normal(self.residual_std, ("mlp", "embed")),
                    bias_init=_zeros(("embed",)), dtype=self.dtype,
                    param_dtype=self.param_dtype, name="c_proj")(x)


class Block(nn.Module):
  """Pre-LayerNorm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""
  num_heads: int
  block_size: int
  residual_std: float
  dropout_rate: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  decode: bool = False
  attention: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, cache_index: jax.Array | None = None) -> jax.Array:
    norm = lambda name: _layer_norm(self.dtype, self.param_dtype, name)
    drop = nn.Dropout(self.dropout_rate, deterministic=not train)
    y = CausalSelfAttention(self.num_heads, self.block_size, self.residual_std, self.dtype,
                            self.param_dtype, self.decode, self.attention,
                            name="attn")(norm("ln_1")(x), cache_index)
    x = x + drop(y)
    y = MLP(self.residual_std, self.dtype, self.param_dtype, name="mlp")(norm("ln_2")(x))
    return x + drop(y)


class GPT(nn.Module):
  """GPT-2 language model: int32 token ids ``(B, T)`` -> float32 logits ``(B, T, vocab_size)``.

  ``h = wte[x] + wpe[positions]``, ``num_layers`` pre-LayerNorm blocks, ``ln_f``, and logits
  ``ln_f(h) @ wte^T`` (the head is tied to the token embedding). Initialisation is GPT-2's:
  N(0, 0.02) for every kernel and embedding, N(0, 0.02 / sqrt(2 * num_layers)) for the two
  residual projections of each block (``attn/c_proj``, ``mlp/c_proj``), zero biases.
  Dropout (embeddings and each residual branch; attention probabilities are not dropped, as
  the fused attention kernel has no dropout) needs a ``"dropout"`` rng only when ``train=True``
  and ``dropout_rate > 0``.

  Attributes:
    vocab_size, block_size: rows of ``wte`` and of ``wpe`` (the longest sequence).
    num_layers, num_heads, embed_dim: depth, attention heads, width ``C``.
    dropout_rate: GPT-2's resid_pdrop / embd_pdrop.
    dtype: compute dtype (e.g. ``"bfloat16"``); LayerNorm statistics and the returned
      logits are float32 whatever it is.
    param_dtype: dtype of the parameters.
    decode: keep a key/value cache in the ``"cache"`` collection; each call appends its
      ``T`` tokens at the cache's position (apply with ``mutable=["cache"]``).
    attention: ``"auto"`` (cuDNN's fused kernel on a GPU in bfloat16/float16, else XLA's),
      ``"xla"`` or ``"cudnn"``: see ``attention_implementation``. Decoding uses XLA's.
    remat: ``"none"`` or ``"blocks"`` (``nn.remat`` per block: the same numbers, the blocks'
      activations recomputed in the backward pass instead of kept).
  """
  vocab_size: int = 50257
  block_size: int = 1024
  num_layers: int = 12
  num_heads: int = 12
  embed_dim: int = 768
  dropout_rate: float = 0.1
  dtype: Dtype = "float32"
  param_dtype: Dtype = "float32"
  decode: bool = False
  attention: str = "auto"
  remat: str = "none"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    length = x.shape[1]
    if length > self.block_size:
      raise ValueError(f"GPT: sequence length {length} exceeds block_size {self.block_size}")
    wte = nn.Embed(self.vocab_size, self.embed_dim, embedding_init=_normal(_INIT_STD, ("vocab", "embed")),
                   dtype=dtype, param_dtype=param_dtype, name="wte")
    wpe = nn.Embed(self.block_size, self.embed_dim, embedding_init=_normal(_INIT_STD, (None, "embed")),
                   dtype=dtype, param_dtype=param_dtype, name="wpe")
    cache_index = None
    positions = jnp.arange(length)
    if self.decode:
      index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
      cache_index = index.value
      positions = positions + cache_index
      if not self.is_initializing():
        index.value = cache_index + length
    h = wte(x) + wpe(positions)[None]
    h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    residual_std = _INIT_STD / math.sqrt(2 * self.num_layers)
    block = block_class(Block, self.remat, self.decode)
    for i in range(self.num_layers):
      h = block(self.num_heads, self.block_size, residual_std, self.dropout_rate, dtype,
                param_dtype, self.decode, self.attention, name=f"h_{i}")(h, train, cache_index)
    h = _layer_norm(dtype, param_dtype, "ln_f")(h)
    return wte.attend(h).astype(jnp.float32)



__all__ = ["GPT", "attention_implementation", "init_cache"]
