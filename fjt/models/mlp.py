"""Fully connected classifier: (Dense -> BatchNorm -> ReLU) blocks, then a Dense head."""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
  """Multi-layer perceptron on inputs flattened to ``(batch, features)``.

  ``features=()`` leaves only the head, so ``MLP(features=(), num_classes=100)``
  on 500 inputs is one ``nn.Dense`` with kernel ``(500, 100)`` and bias ``(100,)``.
  Each hidden layer's ReLU output ``(batch, width)`` is sown as ``intermediates/relu_{i}``.
  Hidden kernels have logical axes ``(embed, mlp)`` (``fjt.sharding``).

  Attributes:
    features: widths of the hidden layers.
    num_classes: width of the output layer (logits).
    batch_norm: whether each hidden layer has a BatchNorm.
    momentum: BatchNorm running-average decay (PyTorch's momentum is 1 - this).
    dtype: compute dtype (e.g. ``"bfloat16"``); BatchNorm statistics and the returned logits
      are float32 whatever it is.
    param_dtype: dtype of the parameters.
  """
  features: Sequence[int] = (256, 256)
  num_classes: int = 10
  batch_norm: bool = True
  momentum: float = 0.9
  dtype: Any = "float32"
  param_dtype: Any = "float32"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    dtypes = {"dtype": jnp.dtype(self.dtype), "param_dtype": jnp.dtype(self.param_dtype)}
    x = x.reshape((x.shape[0], -1))
    for i, width in enumerate(self.features):
      x = nn.Dense(width, kernel_init=nn.with_logical_partitioning(
          nn.linear.default_kernel_init, ("embed", "mlp")), **dtypes)(x)
      if self.batch_norm:
        x = nn.BatchNorm(use_running_average=not train, momentum=self.momentum, **dtypes)(x)
      x = nn.relu(x)
      self.sow("intermediates", f"relu_{i}", x)  # (batch, width); a no-op unless mutable.
    return nn.Dense(self.num_classes, **dtypes)(x).astype(jnp.float32)
