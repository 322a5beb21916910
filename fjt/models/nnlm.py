"""Feed-forward neural language model (Bengio et al., 2003)."""

import flax.linen as nn
import jax


class NNLM(nn.Module):
  """Predicts the next word from a window of previous words.

  Input: int32 word ids ``(batch, context)``. Each id is embedded by
  ``nn.Embed(vocab_size, embed_dim)`` (the embedding table has shape
  ``(vocab_size, embed_dim)``); the embeddings are concatenated to
  ``(batch, context * embed_dim)``, passed through Dense -> BatchNorm -> ReLU,
  and a Dense layer gives logits ``(batch, vocab_size)``. The ReLU output
  ``(batch, hidden)`` is sown as ``intermediates/relu_0``. Logical axes (``fjt.sharding``):
  embedding ``(vocab, embed)``, hidden kernel ``(embed, mlp)``, output kernel ``(mlp, vocab)``.
  """
  vocab_size: int = 5000
  embed_dim: int = 300
  hidden: int = 512
  momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.Embed(self.vocab_size, self.embed_dim, embedding_init=nn.with_logical_partitioning(
        nn.linear.default_embed_init, ("vocab", "embed")))(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(self.hidden, kernel_init=nn.with_logical_partitioning(
        nn.linear.default_kernel_init, ("embed", "mlp")))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.momentum)(x)
    x = nn.relu(x)
    self.sow("intermediates", "relu_0", x)  # (batch, hidden); a no-op unless mutable.
    return nn.Dense(self.vocab_size, kernel_init=nn.with_logical_partitioning(
        nn.linear.default_kernel_init, ("mlp", "vocab")))(x)
