"""Feed-forward neural language model (Bengio et al., 2003)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class NNLM(nn.Module):
  """Predicts the next word from a window of previous words.

  Input: int32 word ids ``(batch, context)``. Each id is embedded by
  ``nn.Embed(vocab_size, embed_dim)`` (the embedding table has shape
  ``(vocab_size, embed_dim)``); the embeddings are concatenated to
  ``(batch, context * embed_dim)``, passed through Dense -> BatchNorm -> ReLU,
  and a Dense layer gives logits ``(batch, vocab_size)``. The ReLU output
  ``(batch, hidden)`` is sown as ``intermediates/relu_0``. Logical axes (``fjt.sharding``):
  embedding ``(vocab, embed)``, hidden kernel ``(embed, mlp)``, output kernel ``(mlp, vocab)``.
  ``dtype`` is the compute dtype (BatchNorm statistics and the returned logits are float32
  whatever it is), ``param_dtype`` the parameters'.
  """
  vocab_size: int = 5000
  embed_dim: int = 300
  hidden: int = 512
  momentum: float = 0.9
  dtype: Any = "float32"
  param_dtype: Any = "float32"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    dtypes = {"dtype": jnp.dtype(self.dtype), "param_dtype": jnp.dtype(self.param_dtype)}
    x = nn.Embed(self.vocab_size, self.embed_dim, embedding_init=nn.with_logical_partitioning(
        nn.linear.default_embed_init, ("vocab", "embed")), **dtypes)(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(self.hidden, kernel_init=nn.with_logical_partitioning(
        nn.linear.default_kernel_init, ("embed", "mlp")), **dtypes)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.momentum, **dtypes)(x)
    x = nn.relu(x)
    self.sow("intermediates", "relu_0", x)  # (batch, hidden); a no-op unless mutable.
    return nn.Dense(self.vocab_size, kernel_init=nn.with_logical_partitioning(
        nn.linear.default_kernel_init, ("mlp", "vocab")), **dtypes)(x).astype(jnp.float32)
