"""Convolutional classifier on NHWC images: (Conv -> BatchNorm -> ReLU -> pool) blocks, then Dense."""

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp


class CNN(nn.Module):
  """Small convolutional network for images of shape ``(batch, height, width, channels)``.

  Each ReLU output is sown as ``intermediates/relu_{i}``, conv blocks first.

  Attributes:
    features: output channels of each conv block.
    kernel_size: spatial size of every convolution (padding "SAME").
    pool: whether each block ends with a 2x2 max pool of stride 2.
    dense_features: widths of the Dense -> ReLU layers after flattening.
    num_classes: width of the output layer (logits).
    momentum: BatchNorm running-average decay (PyTorch's momentum is 1 - this).
    dtype: compute dtype (e.g. ``"bfloat16"``); BatchNorm statistics and the returned logits
      are float32 whatever it is.
    param_dtype: dtype of the parameters.
  """
  features: Sequence[int] = (32, 64)
  kernel_size: int = 3
  pool: bool = True
  dense_features: Sequence[int] = ()
  num_classes: int = 10
  momentum: float = 0.9
  dtype: Any = "float32"
  param_dtype: Any = "float32"
  input_layout: ClassVar[str] = "nhwc"  # Checked against the data's layout before training.

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    dtypes = {"dtype": jnp.dtype(self.dtype), "param_dtype": jnp.dtype(self.param_dtype)}
    for i, channels in enumerate(self.features):
      x = nn.Conv(channels, (self.kernel_size, self.kernel_size), padding="SAME", **dtypes)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=self.momentum, **dtypes)(x)
      x = nn.relu(x)
      self.sow("intermediates", f"relu_{i}", x)  # A no-op unless "intermediates" is mutable.
      if self.pool:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))  # NHWC order: interop permutes PyTorch's NCHW flatten.
    for i, width in enumerate(self.dense_features, start=len(self.features)):
      x = nn.relu(nn.Dense(width, **dtypes)(x))
      self.sow("intermediates", f"relu_{i}", x)
    return nn.Dense(self.num_classes, **dtypes)(x).astype(jnp.float32)
