"""ResNet (He et al., 2015) on NHWC images, laid out as torchvision's ``resnet18/34/50``.

Modules are created in torchvision's registration order (stem conv, BatchNorm, the blocks of
each stage, the head; within a block conv1, bn1, conv2, bn2, [conv3, bn3], projection conv
and BatchNorm), so ``fjt.interop.torch.from_state_dict`` fills a ``ResNet`` from a torchvision
state_dict by order, with no key map.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class UnbiasedBatchNorm(nn.BatchNorm):
  """``nn.BatchNorm`` whose running variance is updated as PyTorch's: with the unbiased batch
  variance ``var * n / (n - 1)`` (``n`` values per channel), where Flax uses the biased ``var``.
  Normalisation (by the biased batch variance in training) and the parameters are the same."""

  def __call__(self, x, use_running_average=None, *, mask=None):
    train = not nn.merge_param("use_running_average", self.use_running_average, use_running_average)
    old = self.get_variable("batch_stats", "var") if train else None
    y = super().__call__(x, use_running_average, mask=mask)
    if old is not None and not self.is_initializing():
      axes = tuple(range(x.ndim - 1))
      n = int(np.prod([x.shape[a] for a in axes]))
      xf = jnp.asarray(x, jnp.float32)
      var = jnp.maximum(jnp.mean(xf * xf, axes) - jnp.mean(xf, axes) ** 2, 0.0)
      self.put_variable("batch_stats", "var",
                        self.momentum * old + (1 - self.momentum) * var * n / max(n - 1, 1))
    return y


# Linen names modules by their class: the variables stay BatchNorm_i, as torchvision's match them.
UnbiasedBatchNorm.__name__ = "BatchNorm"


def _conv(features: int, size: int, stride: int = 1, **dtypes) -> nn.Conv:
  # PyTorch pads size // 2 on every side; "SAME" would pad (0, 1) for stride 2.
  pad = size // 2
  return nn.Conv(features, (size, size), (stride, stride), padding=((pad, pad), (pad, pad)),
                 use_bias=False, **dtypes)


class BasicBlock(nn.Module):
  """3x3 -> 3x3 convolutions plus the input (projected by a 1x1 conv + BatchNorm when the
  stride or width changes). Output width ``features``. ``conv`` and ``norm`` make the
  convolutions and BatchNorms (``_conv`` and ``nn.BatchNorm`` with the network's settings)."""
  features: int
  stride: int
  norm: functools.partial
  conv: Callable[..., nn.Module] = _conv

  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.relu(self.norm()(self.conv(self.features, 3, self.stride)(x)))
    y = self.norm()(self.conv(self.features, 3)(y))
    return nn.relu(y + _shortcut(x, self.features, self.stride, self.norm, self.conv))


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided, torchvision's "v1.5") -> 1x1 convolutions to ``4 * features``."""
  features: int
  stride: int
  norm: functools.partial
  conv: Callable[..., nn.Module] = _conv

  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.relu(self.norm()(self.conv(self.features, 1)(x)))
    y = nn.relu(self.norm()(self.conv(self.features, 3, self.stride)(y)))
    y = self.norm()(self.conv(self.features * 4, 1)(y))
    return nn.relu(y + _shortcut(x, self.features * 4, self.stride, self.norm, self.conv))


def _shortcut(x: jax.Array, features: int, stride: int, norm: functools.partial,
              conv: Callable[..., nn.Module] = _conv) -> jax.Array:
  if stride == 1 and x.shape[-1] == features:
    return x
  return norm()(conv(features, 1, stride)(x))


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
  """ResNet classifier on ``(batch, height, width, channels)`` images -> ``(batch, num_classes)``.

  Attributes:
    stage_sizes: blocks per stage, e.g. ``(2, 2, 2, 2)`` (ResNet-18), ``(3, 4, 6, 3)`` (34, 50).
    widths: the blocks' ``features`` per stage (Bottleneck outputs 4x that).
    block: "basic" or "bottleneck".
    num_classes: width of the output layer (logits).
    stem: "imagenet": 7x7 stride-2 conv + 3x3 stride-2 max pool, as torchvision; "small":
      one 3x3 stride-1 conv, no pool, for tiny images (8x8 digits, 32x32 CIFAR).
    stem_width: output channels of the stem conv.
    momentum: BatchNorm running-average decay (PyTorch's momentum is 1 - this).
    dtype: compute dtype (e.g. ``"bfloat16"``); BatchNorm statistics and the returned logits
      are float32 whatever it is.
    param_dtype: dtype of the parameters.
    unbiased_running_var: update BatchNorm's running variance with the unbiased batch variance,
      as PyTorch does (``UnbiasedBatchNorm``); False: Flax's biased one. Weights imported from
      PyTorch drift from their source with continued training unless this is True.
  Every stage but the first starts with a stride-2 block.
  """
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  widths: Sequence[int] = (64, 128, 256, 512)
  block: str = "basic"
  num_classes: int = 1000
  stem: str = "imagenet"
  stem_width: int = 64
  momentum: float = 0.9
  dtype: Any = "float32"
  param_dtype: Any = "float32"
  unbiased_running_var: bool = False
  input_layout: ClassVar[str] = "nhwc"  # Checked against the data's layout before training.

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if len(self.stage_sizes) != len(self.widths):
      raise ValueError(f"ResNet: stage_sizes {tuple(self.stage_sizes)} and widths "
                       f"{tuple(self.widths)} must have one entry per stage")
    if self.block not in BLOCKS or self.stem not in ("imagenet", "small"):
      raise ValueError(f"ResNet: block must be one of {sorted(BLOCKS)} (got {self.block!r}) and "
                       f"stem 'imagenet' or 'small' (got {self.stem!r})")
    dtypes = {"dtype": jnp.dtype(self.dtype), "param_dtype": jnp.dtype(self.param_dtype)}
    norm = functools.partial(UnbiasedBatchNorm if self.unbiased_running_var else nn.BatchNorm,
                             use_running_average=not train, momentum=self.momentum,
                             epsilon=1e-5, **dtypes)
    conv = functools.partial(_conv, **dtypes)
    if self.stem == "imagenet":
      x = nn.relu(norm()(conv(self.stem_width, 7, 2)(x)))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    else:
      x = nn.relu(norm()(conv(self.stem_width, 3)(x)))
    for stage, (size, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for i in range(size):
        x = BLOCKS[self.block](width, 2 if stage > 0 and i == 0 else 1, norm, conv)(x)
    return nn.Dense(self.num_classes, **dtypes)(jnp.mean(x, axis=(1, 2))).astype(jnp.float32)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block="basic")
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block="basic")
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block="bottleneck")
