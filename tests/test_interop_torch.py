"""fjt.interop.torch against real PyTorch twins of fjt's MLP, CNN and NNLM."""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import shlex
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fjt  # noqa: E402
from fjt.interop import torch as interop  # noqa: E402
from fjt.tree import path_str, unflatten  # noqa: E402

nn = torch.nn
F = torch.nn.functional

MLP_NAMES = ("fc1", "bn1", "fc2", "bn2", "head")
NNLM_NAMES = ("embed", "fc", "bn", "out")


class TorchMLP(nn.Module):
  """fjt.MLP(features=(32, 16), num_classes=10) on 64 inputs."""

  def __init__(self, names=MLP_NAMES, head_first=False):
    super().__init__()
    self.names = names
    layers = dict(zip(names, [nn.Linear(64, 32), nn.BatchNorm1d(32), nn.Linear(32, 16),
                              nn.BatchNorm1d(16), nn.Linear(16, 10)]))
    order = [names[-1], *names[:-1]] if head_first else names  # Registration order = state_dict order.
    for name in order:
      self.add_module(name, layers[name])

  def forward(self, x):
    fc1, bn1, fc2, bn2, head = (getattr(self, name) for name in self.names)
    return head(F.relu(bn2(fc2(F.relu(bn1(fc1(x)))))))


class TorchCNN(nn.Module):
  """fjt.CNN(features=(8, 16), dense_features=(32,), num_classes=10) on 8x8x1 images."""

  def __init__(self):
    super().__init__()
    self.features = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2))
    self.classifier = nn.Sequential(nn.Linear(16 * 2 * 2, 32), nn.ReLU(), nn.Linear(32, 10))

  def forward(self, x):
    return self.classifier(self.features(x).flatten(1))


class TorchNNLM(nn.Module):
  """fjt.NNLM(vocab_size=200, hidden=32) on 3 context words."""

  def __init__(self, names=NNLM_NAMES):
    super().__init__()
    self.names = names
    for name, layer in zip(names, [nn.Embedding(200, 300), nn.Linear(3 * 300, 32),
                                   nn.BatchNorm1d(32), nn.Linear(32, 200)]):
      self.add_module(name, layer)

  def forward(self, x):
    embed, fc, bn, out = (getattr(self, name) for name in self.names)
    return out(F.relu(bn(fc(embed(x).flatten(1)))))


@dataclasses.dataclass
class Case:
  model: object            # the fjt model
  make_torch: object       # () -> a fresh torch twin with natural names
  x: np.ndarray            # fjt input (NHWC images, flat features or word ids)
  torch_x: object          # the same input as PyTorch takes it (NCHW images, int64 ids)
  num_classes: int
  nchw: dict
  reshaped: set            # the torch keys whose layout changes


def make_case(name: str) -> Case:
  rng = np.random.default_rng(0)
  if name == "mlp":
    x = (rng.normal(size=(16, 64)) * 2 + 1).astype(np.float32)
    return Case(fjt.MLP(features=(32, 16), num_classes=10), TorchMLP, x, torch.from_numpy(x), 10,
                {}, {"fc1.weight", "fc2.weight", "head.weight"})
  if name == "cnn":
    x = (rng.normal(size=(16, 8, 8, 1)) * 2 + 1).astype(np.float32)
    model = fjt.CNN(features=(8, 16), dense_features=(32,), num_classes=10)
    return Case(model, TorchCNN, x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), 10,
                interop.cnn_nchw_flatten(model, x.shape),
                {"features.0.weight", "features.4.weight", "classifier.0.weight",
                 "classifier.2.weight"})
  x = rng.integers(0, 200, size=(16, 3)).astype(np.int32)
  return Case(fjt.NNLM(vocab_size=200, hidden=32), TorchNNLM, x, torch.from_numpy(x).long(), 200,
              {}, {"fc.weight", "out.weight"})


def train_a_few_steps(module, x, num_classes):
  """Non-trivial weights and running statistics: 5 SGD steps in train mode on random labels."""
  torch.manual_seed(0)
  opt = torch.optim.SGD(module.parameters(), lr=0.1)
  module.train()
  for _ in range(5):
    loss = F.cross_entropy(module(x), torch.randint(0, num_classes, (x.shape[0],)))
    opt.zero_grad()
    loss.backward()
    opt.step()
  return module.eval()


@pytest.fixture(scope="module", params=["mlp", "cnn", "nnlm"])
def case(request):
  case = make_case(request.param)
  torch.manual_seed(1)
  case.trained = train_a_few_steps(case.make_torch(), case.torch_x, case.num_classes)
  return case


def target(case):
  """The variables' shapes and dtypes (``jax.ShapeDtypeStruct``): all ``from_state_dict`` needs."""
  x = jnp.asarray(case.x[:1])
  return jax.eval_shape(lambda: fjt.init_variables(case.model, x, jax.random.PRNGKey(0)))


def random_variables(case, seed):
  """Random variables of init's scale (kernels ~ 1/sqrt(fan_in), positive variances);
  cheaper than compiling ``model.init``."""
  rng = np.random.default_rng(seed)

  def leaf(keypath, spec):
    path = path_str(keypath)
    if path.endswith("/var"):
      return rng.uniform(0.5, 2.0, spec.shape).astype(spec.dtype)
    scale = 1 / np.sqrt(np.prod(spec.shape[:-1])) if path.endswith("/kernel") else 0.5
    return (scale * rng.normal(size=spec.shape)).astype(spec.dtype)

  return jax.tree_util.tree_map_with_path(leaf, target(case))


def torch_out(module, x):
  with torch.no_grad():
    return module.eval()(x).numpy()


def fjt_out(case, variables):
  return np.asarray(case.model.apply(variables, case.x, train=False))


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_imported_torch_weights_give_torch_eval_outputs(case):
  state_dict = case.trained.state_dict()
  variables, report = interop.from_state_dict(state_dict, target(case), nchw_flatten=case.nchw)
  assert report.unmatched == ()
  assert report.unused == tuple(k for k in state_dict if k.endswith(".num_batches_tracked"))
  assert set(report.reshaped) == case.reshaped
  assert set(report.matched) == set(state_dict) - set(report.unused)
  # Training moved the running statistics away from their (0, 1) start.
  stats = variables["batch_stats"]["BatchNorm_0"]
  assert np.abs(stats["mean"]).max() > 1e-2 and np.abs(stats["var"] - 1).max() > 1e-2
  np.testing.assert_allclose(fjt_out(case, variables), torch_out(case.trained, case.torch_x),
                             rtol=0, atol=1e-5)


def test_cnn_modules_pair_by_kind_in_registration_order():
  case = make_case("cnn")
  _, report = interop.from_state_dict(TorchCNN().state_dict(), target(case), nchw_flatten=case.nchw)
  assert report.matched == {
      "features.0.weight": "params/Conv_0/kernel", "features.0.bias": "params/Conv_0/bias",
      "features.1.weight": "params/BatchNorm_0/scale", "features.1.bias": "params/BatchNorm_0/bias",
      "features.1.running_mean": "batch_stats/BatchNorm_0/mean",
      "features.1.running_var": "batch_stats/BatchNorm_0/var",
      "features.4.weight": "params/Conv_1/kernel", "features.4.bias": "params/Conv_1/bias",
      "features.5.weight": "params/BatchNorm_1/scale", "features.5.bias": "params/BatchNorm_1/bias",
      "features.5.running_mean": "batch_stats/BatchNorm_1/mean",
      "features.5.running_var": "batch_stats/BatchNorm_1/var",
      "classifier.0.weight": "params/Dense_0/kernel", "classifier.0.bias": "params/Dense_0/bias",
      "classifier.2.weight": "params/Dense_1/kernel", "classifier.2.bias": "params/Dense_1/bias",
  }
  assert report.unused == ("features.1.num_batches_tracked", "features.5.num_batches_tracked")


def test_cnn_needs_the_nchw_flatten_permutation():
  case = make_case("cnn")
  assert case.nchw == {"params/Dense_0": (16, 2, 2)}
  module = TorchCNN().eval()
  variables, _ = interop.from_state_dict(module.state_dict(), target(case))
  assert np.abs(fjt_out(case, variables) - torch_out(module, case.torch_x)).max() > 1e-3
  with pytest.raises(ValueError, match=r"nchw_flatten\['params/Dense_0'\] = \(16, 4, 4\).*64 input rows"):
    interop.from_state_dict(module.state_dict(), target(case),
                            nchw_flatten={"params/Dense_0": (16, 4, 4)})
  with pytest.raises(ValueError, match=r"nchw_flatten key 'params/Conv_0'.*Dense"):
    interop.from_state_dict(module.state_dict(), target(case),
                            nchw_flatten={"params/Conv_0": (16, 2, 2)})


def test_fjt_torch_fjt_round_trip_is_bitwise(case):
  variables, _ = interop.from_state_dict(case.trained.state_dict(), target(case),
                                         nchw_flatten=case.nchw)
  for tree in (variables, jax.tree.map(lambda a: a.astype(jnp.bfloat16), variables)):
    state_dict = interop.to_state_dict(tree, nchw_flatten=case.nchw)
    fresh = jax.tree.map(lambda s, t: jax.ShapeDtypeStruct(s.shape, t.dtype), target(case), tree)
    back, report = interop.from_state_dict(state_dict, fresh, nchw_flatten=case.nchw)
    assert_trees_equal(back, tree)
    assert report.unmatched == ()
    assert all(k.endswith(".num_batches_tracked") for k in report.unused)
    # And through torch tensors, whose bfloat16 numpy cannot hold.
    back, _ = interop.from_state_dict(interop.to_torch(state_dict), fresh, nchw_flatten=case.nchw)
    assert_trees_equal(back, tree)


def test_torch_loads_to_state_dict_strictly_with_names_from_the_import_report(case):
  variables, report = interop.from_state_dict(case.trained.state_dict(), target(case),
                                              nchw_flatten=case.nchw)
  key_map = [(re.escape(path), key) for key, path in report.matched.items()]
  state_dict = interop.to_state_dict(variables, key_map=key_map, nchw_flatten=case.nchw)
  assert sorted(state_dict) == sorted(case.trained.state_dict())
  assert state_dict[report.unused[0]].dtype == np.int64  # num_batches_tracked
  fresh = case.make_torch()
  fresh.load_state_dict(interop.to_torch(state_dict), strict=True)
  np.testing.assert_allclose(torch_out(fresh, case.torch_x), fjt_out(case, variables),
                             rtol=0, atol=1e-5)
  # like=report: the same keys with no rules, and the counters' values; bit for bit.
  like = interop.to_state_dict(variables, like=report, nchw_flatten=case.nchw)
  fresh.load_state_dict(interop.to_torch(like), strict=True)
  for key, value in case.trained.state_dict().items():
    assert torch.equal(fresh.state_dict()[key], value), key


@pytest.mark.parametrize("name,make_torch", [
    ("mlp", lambda: TorchMLP(names=("Dense_0", "BatchNorm_0", "Dense_1", "BatchNorm_1", "Dense_2"))),
    ("nnlm", lambda: TorchNNLM(names=("Embed_0", "Dense_0", "BatchNorm_0", "Dense_1"))),
])
def test_default_names_load_into_a_torch_module_with_flax_names(name, make_torch):
  case = make_case(name)
  variables = random_variables(case, seed=3)
  state_dict = interop.to_state_dict(variables)
  assert state_dict["Dense_0.weight"].shape == variables["params"]["Dense_0"]["kernel"].shape[::-1]
  assert state_dict["BatchNorm_0.num_batches_tracked"].shape == ()
  module = make_torch()
  module.load_state_dict(interop.to_torch(state_dict), strict=True)
  np.testing.assert_allclose(torch_out(module, case.torch_x), fjt_out(case, variables),
                             rtol=0, atol=1e-5)


def test_dense_10_comes_after_dense_9_even_when_jax_sorted_the_keys():
  # Twelve Dense layers of distinct shapes: any misordering is a shape error.
  params = {f"Dense_{i}": {"kernel": np.full((i + 1, i + 2), i, np.float32),
                           "bias": np.full((i + 2,), -i, np.float32)} for i in range(12)}
  variables = jax.tree.map(lambda a: a, {"params": params})
  assert list(variables["params"])[:3] == ["Dense_0", "Dense_1", "Dense_10"]  # Sorted as text.
  state_dict = interop.to_state_dict(variables)
  assert list(state_dict)[-4:] == ["Dense_10.weight", "Dense_10.bias", "Dense_11.weight", "Dense_11.bias"]
  renamed = {key.replace("Dense_", "layers."): value for key, value in state_dict.items()}
  back, report = interop.from_state_dict(renamed, variables)
  assert report.matched["layers.10.weight"] == "params/Dense_10/kernel"
  assert_trees_equal(back, variables)


def test_nested_modules_get_dotted_names():
  variables = {"params": {"Block_0": {"BatchNorm_0": {"scale": np.ones(3, np.float32),
                                                      "bias": np.zeros(3, np.float32)}}},
               "batch_stats": {"Block_0": {"BatchNorm_0": {"mean": np.full(3, 0.5, np.float32),
                                                           "var": np.full(3, 2.0, np.float32)}}}}
  state_dict = interop.to_state_dict(variables)
  assert list(state_dict) == [f"Block_0.BatchNorm_0.{name}" for name in (
      "weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
  module = nn.Module()
  module.Block_0 = nn.Module()
  module.Block_0.BatchNorm_0 = nn.BatchNorm1d(3)
  module.load_state_dict(interop.to_torch(state_dict), strict=True)
  assert torch.equal(module.Block_0.BatchNorm_0.running_var, torch.full((3,), 2.0))
  back, report = interop.from_state_dict(state_dict, variables)
  assert_trees_equal(back, variables)
  assert report.unused == ("Block_0.BatchNorm_0.num_batches_tracked",)


def test_key_map_sends_a_renamed_module_where_order_cannot():
  case = make_case("mlp")
  torch.manual_seed(2)
  module = TorchMLP(head_first=True).eval()  # 'head' is the first Linear in its state_dict.
  with pytest.raises(ValueError, match=r"'head\.weight'.*\(10, 16\).*'params/Dense_0/kernel'.*\(64, 32\)"):
    interop.from_state_dict(module.state_dict(), target(case))
  key_map = [(r"head\.weight", "params/Dense_2/kernel"), (r"head\.bias", "params/Dense_2/bias")]
  variables, report = interop.from_state_dict(module.state_dict(), target(case), key_map=key_map)
  assert report.matched["head.weight"] == "params/Dense_2/kernel"
  assert report.matched["fc1.weight"] == "params/Dense_0/kernel"
  assert report.unmatched == ()
  np.testing.assert_allclose(fjt_out(case, variables), torch_out(module, case.torch_x),
                             rtol=0, atol=1e-5)


def test_key_map_can_drop_keys_and_names_bad_targets():
  case = make_case("mlp")
  init = jax.tree.map(jnp.asarray, random_variables(case, seed=4))
  state_dict = TorchMLP().state_dict()
  # A new head: drop the old one, the target's freshly initialised Dense_2 stays.
  with pytest.raises(interop.StateDictMismatch, match=re.escape(
      "2 Flax paths got no value: ['params/Dense_2/bias', 'params/Dense_2/kernel']; 0 torch keys")):
    interop.from_state_dict(state_dict, init, key_map=[(r"head\..*", None)])
  variables, report = interop.from_state_dict(state_dict, init, key_map=[(r"head\..*", None)],
                                              strict=False)
  assert report.unused[-2:] == ("head.weight", "head.bias")
  assert report.unmatched == ("params/Dense_2/bias", "params/Dense_2/kernel")
  for leaf in ("kernel", "bias"):
    assert variables["params"]["Dense_2"][leaf] is init["params"]["Dense_2"][leaf]
  with pytest.raises(ValueError, match=r"maps torch key 'head\.weight' to Flax path "
                                       r"'params/Head/kernel', which the target does not have"):
    interop.from_state_dict(state_dict, init, key_map=[(r"head\.(weight)", "params/Head/kernel")])
  with pytest.raises(ValueError, match=r"'fc1\.bias' and 'fc2\.bias' both map to Flax path"):
    interop.from_state_dict(state_dict, init, key_map=[(r"fc\d\.bias", "params/Dense_0/bias")])


def test_a_wrong_shape_names_the_torch_key_and_the_flax_path():
  case = make_case("mlp")
  state_dict = dict(TorchMLP().state_dict())
  state_dict["fc1.weight"] = torch.zeros(32, 63)
  with pytest.raises(ValueError, match=re.escape(
      "torch key 'fc1.weight' has shape (32, 63), but Flax path 'params/Dense_0/kernel' has "
      "shape (64, 32) and takes a torch tensor of shape (32, 64)")):
    interop.from_state_dict(state_dict, target(case))


def test_safetensors_round_trips_are_bitwise(tmp_path):
  case = make_case("cnn")
  variables = random_variables(case, seed=5)
  tree = {"params": jax.tree.map(lambda a: a.astype(jnp.bfloat16), variables["params"]),
          "batch_stats": variables["batch_stats"], "step": np.array(7, np.int64)}
  interop.save_file(tree, tmp_path / "tree.safetensors")
  assert_trees_equal(unflatten(interop.load_file(tmp_path / "tree.safetensors")), jax.device_get(tree))

  # A torch state_dict: the format keeps no order, keys come back in natural order.
  module = TorchCNN().to(torch.bfloat16)
  interop.save_file(module.state_dict(), tmp_path / "cnn.safetensors")
  loaded = interop.load_file(tmp_path / "cnn.safetensors")
  assert list(loaded)[:3] == ["classifier.0.bias", "classifier.0.weight", "classifier.2.bias"]
  assert loaded["features.4.weight"].dtype == ml_dtypes.bfloat16
  for key, value in interop.to_torch(loaded).items():
    assert value.dtype == module.state_dict()[key].dtype
    assert torch.equal(value, module.state_dict()[key])
  # ... which still pairs modules of a kind in order.
  direct, _ = interop.from_state_dict(module.state_dict(), variables, nchw_flatten=case.nchw)
  via_file, _ = interop.from_state_dict(loaded, variables, nchw_flatten=case.nchw)
  assert_trees_equal(via_file, direct)
  # PyTorch's own reader agrees, bfloat16 included.
  import safetensors.torch
  for key, value in safetensors.torch.load_file(tmp_path / "cnn.safetensors").items():
    assert torch.equal(value, module.state_dict()[key])
    assert value.dtype == module.state_dict()[key].dtype


def test_pt_files_round_trip_bitwise_and_keep_order(tmp_path):
  case = make_case("nnlm")
  state_dict = interop.to_state_dict(jax.tree.map(lambda a: a.astype(jnp.bfloat16),
                                                  random_variables(case, seed=6)))
  interop.save_file(state_dict, tmp_path / "w.pt")
  loaded = interop.load_file(tmp_path / "w.pt")
  assert list(loaded) == list(state_dict)
  assert_trees_equal(loaded, state_dict)
  assert not [p for p in os.listdir(tmp_path) if p != "w.pt"]  # No temporary file left behind.

  module = TorchNNLM()
  torch.save(module.state_dict(), tmp_path / "torch.pth")
  loaded = interop.load_file(tmp_path / "torch.pth")
  assert list(loaded) == list(module.state_dict())
  for key, value in module.state_dict().items():
    np.testing.assert_array_equal(loaded[key], value.numpy())


class RunsCode:
  """Unpickling this runs a shell command: what a full unpickle of a hostile .pt file does."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_a_pt_file_whose_pickle_runs_code_is_refused(tmp_path):
  marker = tmp_path / "marker"
  path = tmp_path / "hostile.pt"
  torch.save({"fc.weight": torch.zeros(2, 2), "payload": RunsCode(marker)}, path)
  with pytest.raises(ValueError, match=re.escape(f"{str(path)!r} is not a weights-only PyTorch file, "
                                                 "and only weights-only files are accepted")):
    interop.load_file(path)
  assert not marker.exists()
  torch.load(path, weights_only=False)  # The payload is live: a full unpickle runs it.
  assert marker.exists()


def test_a_pt_file_that_is_not_a_state_dict_is_refused(tmp_path):
  torch.save({"model": {"w": torch.zeros(1)}, "epoch": 3}, tmp_path / "ckpt.pt")
  with pytest.raises(ValueError, match=r"ckpt\.pt'.*key 'model' holds a dict"):
    interop.load_file(tmp_path / "ckpt.pt")
  torch.save([torch.zeros(1)], tmp_path / "list.pt")
  with pytest.raises(ValueError, match=r"list\.pt'.*found a list"):
    interop.load_file(tmp_path / "list.pt")


def test_unknown_file_types_name_the_file_and_the_supported_ones(tmp_path):
  for call in (lambda p: interop.load_file(p), lambda p: interop.save_file({"w": np.zeros(1)}, p)):
    with pytest.raises(ValueError, match=r"'.*weights\.npz': unknown weight file type '\.npz'; "
                                         r"supported: \.safetensors, \.pt, \.pth"):
      call(str(tmp_path / "weights.npz"))


def test_without_torch_only_torch_work_fails_and_says_how_to_install(tmp_path, monkeypatch):
  case = make_case("mlp")
  variables = random_variables(case, seed=7)
  state_dict = interop.to_state_dict(variables)
  monkeypatch.setitem(sys.modules, "torch", None)  # What `import torch` sees when it is missing.
  monkeypatch.setattr(fjt, "interop", sys.modules["fjt.interop"])  # The re-import rebinds it.
  monkeypatch.delitem(sys.modules, "fjt.interop.torch")
  monkeypatch.delitem(sys.modules, "fjt.interop")
  fresh = importlib.import_module("fjt.interop.torch")
  install = r"install the torch extra with `pip install -e '\.\[torch\]'`"
  with pytest.raises(ImportError, match=install):
    fresh.load_file(tmp_path / "w.pt")
  with pytest.raises(ImportError, match=install):
    fresh.save_file(state_dict, tmp_path / "w.pt")
  with pytest.raises(ImportError, match=install):
    fresh.to_torch(state_dict)
  # Arrays and safetensors need no torch.
  back, _ = fresh.from_state_dict(state_dict, variables)
  assert_trees_equal(back, variables)
  fresh.save_file(state_dict, tmp_path / "w.safetensors")
  assert_trees_equal(dict(fresh.load_file(tmp_path / "w.safetensors")), state_dict)
