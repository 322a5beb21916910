"""PyTorch twins of fjt's models, with the module names ``to_state_dict`` writes.

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

from fjt.models import CNN, MLP, NNLM


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


def torch_module(model, example_shape) -> nn.Module:
  """The PyTorch twin of an fjt ``MLP``, ``CNN`` or ``NNLM`` for fjt inputs of one
  example of ``example_shape`` (no batch axis): ``(64,)``, ``(8, 8, 1)``, ``(context,)``."""
  shape = tuple(int(d) for d in example_shape)
  if isinstance(model, MLP):
    return TorchMLP(model, math.prod(shape))
  if isinstance(model, CNN):
    return TorchCNN(model, shape)
  if isinstance(model, NNLM):
    return TorchNNLM(model, shape[0])
  raise TypeError(f"no PyTorch twin for {type(model).__name__}; known: MLP, CNN, NNLM")
