"""PyTorch twins of fjt's models: the MLP, CNN and NNLM with the module names ``to_state_dict``
writes, the ResNet with torchvision's.

``torch_module(fjt.MLP(...))`` is an ``nn.Module`` computing the same function
as the fjt model in eval mode, whose ``load_state_dict(strict=True)`` takes
``to_torch(to_state_dict(variables, ...))`` as it is (``Dense_0.weight``,
``BatchNorm_0.running_mean``, ...). Importing this module imports torch.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from fjt.models import CNN, MLP, NNLM, ResNet


def _batch_norm(cls, features: int, momentum: float) -> nn.Module:
  return cls(features, eps=1e-5, momentum=1.0 - momentum)  # Flax's momentum is PyTorch's 1 - m.


class TorchMLP(nn.Module):
  def __init__(self, model: MLP, in_features: int):
    super().__init__()
    self.batch_norm = model.batch_norm
    widths = [in_features, *model.features]
    for i, (n_in, n_out) in enumerate(zip(widths, widths[1:])):
      self.add_module(f"Dense_{i}", nn.Linear(n_in, n_out))
      if model.batch_norm:
        self.add_module(f"BatchNorm_{i}", _batch_norm(nn.BatchNorm1d, n_out, model.momentum))
    self.depth = len(model.features)
    self.add_module(f"Dense_{self.depth}", nn.Linear(widths[-1], model.num_classes))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x.flatten(1)
    for i in range(self.depth):
      x = getattr(self, f"Dense_{i}")(x)
      if self.batch_norm:
        x = getattr(self, f"BatchNorm_{i}")(x)
      x = F.relu(x)
    return getattr(self, f"Dense_{self.depth}")(x)


class TorchCNN(nn.Module):
  """Takes NCHW images (fjt's CNN takes NHWC)."""

  def __init__(self, model: CNN, in_shape: tuple[int, int, int]):
    super().__init__()
    height, width, channels = in_shape
    self.pool, self.convs = model.pool, len(model.features)
    for i, out in enumerate(model.features):
      # padding="same" matches Flax's "SAME" for odd kernels.
      self.add_module(f"Conv_{i}", nn.Conv2d(channels, out, model.kernel_size, padding="same"))
      self.add_module(f"BatchNorm_{i}", _batch_norm(nn.BatchNorm2d, out, model.momentum))
      channels = out
      if model.pool:
        height, width = height // 2, width // 2
    widths = [channels * height * width, *model.dense_features, model.num_classes]
    for i, (n_in, n_out) in enumerate(zip(widths, widths[1:])):
      self.add_module(f"Dense_{i}", nn.Linear(n_in, n_out))
    self.denses = len(widths) - 1

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    for i in range(self.convs):
      x = F.relu(getattr(self, f"BatchNorm_{i}")(getattr(self, f"Conv_{i}")(x)))
      if self.pool:
        x = F.max_pool2d(x, 2, 2)
    x = x.flatten(1)
    for i in range(self.denses - 1):
      x = F.relu(getattr(self, f"Dense_{i}")(x))
    return getattr(self, f"Dense_{self.denses - 1}")(x)


class TorchNNLM(nn.Module):
  def __init__(self, model: NNLM, context: int):
    super().__init__()
    self.Embed_0 = nn.Embedding(model.vocab_size, model.embed_dim)
    self.Dense_0 = nn.Linear(context * model.embed_dim, model.hidden)
    self.BatchNorm_0 = _batch_norm(nn.BatchNorm1d, model.hidden, model.momentum)
    self.Dense_1 = nn.Linear(model.hidden, model.vocab_size)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.Dense_1(F.relu(self.BatchNorm_0(self.Dense_0(self.Embed_0(x).flatten(1)))))


class BasicBlock(nn.Module):
  """torchvision.models.resnet.BasicBlock: the same attribute names and forward."""
  expansion = 1

  def __init__(self, inplanes: int, planes: int, stride: int, momentum: float):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = _batch_norm(nn.BatchNorm2d, planes, momentum)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = _batch_norm(nn.BatchNorm2d, planes, momentum)
    self.downsample = _downsample(inplanes, planes, stride, momentum)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
  """torchvision.models.resnet.Bottleneck (stride on the 3x3 conv)."""
  expansion = 4

  def __init__(self, inplanes: int, planes: int, stride: int, momentum: float):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = _batch_norm(nn.BatchNorm2d, planes, momentum)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = _batch_norm(nn.BatchNorm2d, planes, momentum)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = _batch_norm(nn.BatchNorm2d, planes * 4, momentum)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = _downsample(inplanes, planes * 4, stride, momentum)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def _downsample(inplanes: int, planes: int, stride: int, momentum: float) -> nn.Module | None:
  if stride == 1 and inplanes == planes:
    return None
  return nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                       _batch_norm(nn.BatchNorm2d, planes, momentum))


class TorchResNet(nn.Module):
  """torchvision.models.ResNet's module names and structure (``conv1``, ``bn1``, ``relu``,
  ``maxpool``, ``layer1``..., ``avgpool``, ``fc``) for an fjt ``ResNet``; takes NCHW images.
  ``TorchResNet(fjt.models.resnet.ResNet18(num_classes=1000))`` has the keys and shapes of
  ``torchvision.models.resnet18()``."""

  def __init__(self, model: ResNet, in_channels: int):
    super().__init__()
    block = {"basic": BasicBlock, "bottleneck": Bottleneck}[model.block]
    small = model.stem == "small"
    self.conv1 = nn.Conv2d(in_channels, model.stem_width, 3 if small else 7, 1 if small else 2,
                           1 if small else 3, bias=False)
    self.bn1 = _batch_norm(nn.BatchNorm2d, model.stem_width, model.momentum)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.Identity() if small else nn.MaxPool2d(3, 2, 1)
    inplanes = model.stem_width
    for stage, (size, width) in enumerate(zip(model.stage_sizes, model.widths)):
      blocks = []
      for i in range(size):
        blocks.append(block(inplanes, width, 2 if stage > 0 and i == 0 else 1, model.momentum))
        inplanes = width * block.expansion
      self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
    self.stages = len(model.stage_sizes)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(inplanes, model.num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    for stage in range(self.stages):
      x = getattr(self, f"layer{stage + 1}")(x)
    return self.fc(torch.flatten(self.avgpool(x), 1))


def torch_module(model, example_shape) -> nn.Module:
  """The PyTorch twin of an fjt ``MLP``, ``CNN``, ``NNLM`` or ``ResNet`` for fjt inputs of one
  example of ``example_shape`` (no batch axis): ``(64,)``, ``(8, 8, 1)``, ``(context,)``.
  The CNN and ResNet twins take NCHW images."""
  shape = tuple(int(d) for d in example_shape)
  if isinstance(model, MLP):
    return TorchMLP(model, math.prod(shape))
  if isinstance(model, CNN):
    return TorchCNN(model, shape)
  if isinstance(model, NNLM):
    return TorchNNLM(model, shape[0])
  if isinstance(model, ResNet):
    return TorchResNet(model, shape[-1])
  raise TypeError(f"no PyTorch twin for {type(model).__name__}; known: MLP, CNN, NNLM, ResNet")
