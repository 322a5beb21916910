"""fjt.models.ResNet has torchvision's shapes, and its PyTorch twin computes the same function."""

import math

import jax
import numpy as np
import pytest

from fjt.interop.torch import abstract_variables
from fjt.models.resnet import ResNet, ResNet18, ResNet50


@pytest.mark.parametrize("make, count", [(ResNet18, 11_689_512), (ResNet50, 25_557_032)])
def test_parameter_counts_are_torchvisions(make, count):
  # torchvision.models.resnet18() / resnet50(): sum(p.numel() for p in m.parameters()).
  variables = abstract_variables(make(num_classes=1000), np.zeros((1, 64, 64, 3), np.float32))
  assert sum(math.prod(a.shape) for a in jax.tree.leaves(variables["params"])) == count


def test_bottleneck_twin_gives_the_same_logits():
  torch = pytest.importorskip("torch", reason="the PyTorch twin")
  from fjt.interop import torch as interop
  from fjt.interop.torch_models import torch_module
  model = ResNet(stage_sizes=(1, 2), widths=(4, 8), block="bottleneck", num_classes=5,
                 stem_width=8)
  x = np.random.default_rng(0).normal(size=(3, 16, 16, 2)).astype(np.float32)
  torch.manual_seed(0)
  module = torch_module(model, x.shape[1:])
  module.train()
  with torch.no_grad():
    module(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))  # Running statistics move.
  module.eval()
  variables, report = interop.from_state_dict(module, abstract_variables(model, x[:1]))
  assert report.matched["layer2.0.conv3.weight"] == "params/Bottleneck_1/Conv_2/kernel"
  assert report.matched["layer1.0.downsample.1.running_mean"] == "batch_stats/Bottleneck_0/BatchNorm_3/mean"
  with torch.no_grad():
    expected = module(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  np.testing.assert_allclose(model.apply(variables, x, train=False), expected, rtol=0, atol=1e-5)


def import_torchvision():
  """torchvision where it imports: its PyPI wheel for torch 2.13.0 fails to import on some
  machines with errors other than ImportError."""
  pytest.importorskip("torch", reason="torchvision needs PyTorch")
  try:
    import torchvision
  except Exception as e:  # noqa: BLE001 - any failure to import means: not here.
    pytest.skip(f"torchvision does not import here: {type(e).__name__}: {e}")
  return torchvision


def test_torchvision_resnet18_imports_by_order_and_the_twin_has_its_keys():
  torchvision = import_torchvision()
  import torch
  from fjt.interop import torch as interop
  from fjt.interop.torch_models import torch_module
  model = ResNet18(num_classes=10)
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  module = torchvision.models.resnet18(num_classes=10).eval()
  twin = torch_module(model, x.shape[1:])
  assert {k: v.shape for k, v in twin.state_dict().items()} == {
      k: v.shape for k, v in module.state_dict().items()}
  variables, report = interop.from_state_dict(module, abstract_variables(model, x[:1]))
  with torch.no_grad():
    expected = module(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  np.testing.assert_allclose(model.apply(variables, x, train=False), expected, rtol=0, atol=1e-4)
  fresh = torchvision.models.resnet18(num_classes=10)
  fresh.load_state_dict(interop.to_torch(interop.to_state_dict(variables, like=report)), strict=True)


def test_digits_resnet_config_builds_a_small_resnet_for_8x8_images():
  import os

  import fjt
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = fjt.load_config(os.path.join(root, "configs", "digits_resnet.py"))
  model = fjt.create_model(config.model)
  assert isinstance(model, ResNet) and model.stem == "small" and config.data.layout == "nhwc"
  variables = abstract_variables(model, np.zeros((1, 8, 8, 1), np.float32))
  assert list(variables["params"]) == ["Conv_0", "BatchNorm_0", "BasicBlock_0", "BasicBlock_1",
                                       "Dense_0"]
  assert variables["params"]["BasicBlock_1"]["Conv_2"]["kernel"].shape == (1, 1, 16, 32)
