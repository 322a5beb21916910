"""Convolutional classifier on NHWC images: (Conv -> BatchNorm -> ReLU -> pool) blocks, then Dense."""

from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn
import jax


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
  """
  features: Sequence[int] = (32, 64)
  kernel_size: int = 3
  pool: bool = True
  dense_features: Sequence[int] = ()
  num_classes: int = 10
  momentum: float = 0.9
  input_layout: ClassVar[str] = "nhwc"  # Checked against the data's layout before training.

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i, channels in enumerate(self.features):
      x = nn.Conv(channels, (self.kernel_size, self.kernel_size), padding="SAME")(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=self.momentum)(x)
      x = nn.relu(x)
      self.sow("intermediates", f"relu_{i}", x)  # A no-op unless "intermediates" is mutable.
      if self.pool:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))  # NHWC order: interop permutes PyTorch's NCHW flatten.
    for i, width in enumerate(self.dense_features, start=len(self.features)):
      x = nn.relu(nn.Dense(width)(x))
      self.sow("intermediates", f"relu_{i}", x)
    return nn.Dense(self.num_classes)(x)
