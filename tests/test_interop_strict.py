"""fjt.interop.torch never loads silently wrong: strict imports, known layouts, no order
guessed for sources without order, round trips to the source's own names (issue 13)."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="interop tests need PyTorch (the interop extra)")

import fjt  # noqa: E402
from fjt.interop import torch as interop  # noqa: E402
from fjt.interop.torch_models import torch_module  # noqa: E402
from fjt.models.resnet import ResNet18  # noqa: E402

nn = torch.nn
F = torch.nn.functional


def train_a_few_steps(module, x, labels, steps=3):
  """Real weights and running statistics: SGD steps in train mode, then eval mode."""
  torch.manual_seed(0)
  opt = torch.optim.SGD(module.parameters(), lr=0.01)
  module.train()
  for _ in range(steps):
    loss = F.cross_entropy(module(x), labels)
    opt.zero_grad()
    loss.backward()
    opt.step()
  return module.eval()


def torch_out(module, *args):
  with torch.no_grad():
    return module.eval()(*args)


def assert_state_dicts_equal(a, b):
  assert list(a) == list(b)
  for key in a:
    assert a[key].dtype == b[key].dtype, key
    assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def resnet():
  model = ResNet18(num_classes=10)
  x = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype(np.float32)
  torch_x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  torch.manual_seed(0)
  module = train_a_few_steps(torch_module(model, x.shape[1:]), torch_x, torch.tensor([1, 2, 3, 4]))
  return model, x, torch_x, module, interop.abstract_variables(model, x[:1])


def test_resnet18_twin_imports_by_definition_order_and_round_trips_strictly(resnet):
  model, x, torch_x, module, target = resnet
  assert list(target["params"])[:3] == ["Conv_0", "BatchNorm_0", "BasicBlock_0"]  # Not sorted.
  for source in (module, module.state_dict()):
    variables, report = interop.from_state_dict(source, target)
    assert report.unmatched == () and len(report.matched) == 102
    assert report.matched["conv1.weight"] == "params/Conv_0/kernel"
    assert report.matched["layer2.0.downsample.0.weight"] == "params/BasicBlock_2/Conv_2/kernel"
    assert report.matched["layer4.1.bn2.running_var"] == "batch_stats/BasicBlock_7/BatchNorm_1/var"
    assert report.layouts["fc.weight"] == "linear" and report.layouts["conv1.weight"] == "conv"
    assert report.counters["bn1.num_batches_tracked"] == 3
    logits = np.asarray(model.apply(variables, x, train=False))
    np.testing.assert_allclose(logits, torch_out(module, torch_x).numpy(), rtol=0, atol=1e-4)

  fresh = torch_module(model, x.shape[1:])
  fresh.load_state_dict(interop.to_torch(interop.to_state_dict(variables, like=report)), strict=True)
  assert_state_dicts_equal(fresh.state_dict(), module.state_dict())  # num_batches_tracked too.


def test_resnet18_from_safetensors_by_torchvision_names_else_asks_for_a_key_map(resnet, tmp_path):
  model, x, torch_x, module, target = resnet
  interop.save_file(module.state_dict(), tmp_path / "resnet.safetensors")
  # torchvision's names fix the modules' order (issue 24): no key_map needed.
  variables, report = interop.from_state_dict(interop.load_file(tmp_path / "resnet.safetensors"), target)
  assert report.unmatched == () and len(report.matched) == 102
  np.testing.assert_allclose(np.asarray(model.apply(variables, x, train=False)),
                             torch_out(module, torch_x).numpy(), rtol=0, atol=1e-4)
  # Names that fix nothing (layer -> stage): never matched by an order the file lacks.
  renamed = {k.replace("layer", "stage"): v for k, v in module.state_dict().items()}
  interop.save_file(renamed, tmp_path / "renamed.safetensors")
  with pytest.raises(ValueError, match=r"keeps no order.*neither names nor shapes decide.*"
                                       r"'stage1\.0\.bn1'.*key_map"):
    interop.from_state_dict(interop.load_file(tmp_path / "renamed.safetensors"), target)


def mlp_state_dict_with_renamed_batchnorms():
  """The digits MLP's state_dict (fjt names), its BatchNorms renamed so that they sort out of
  module order: 'bn_hidden' (the second) sorts before 'bn_in' (the first)."""
  model = fjt.MLP(features=(32, 32), num_classes=10)
  x = np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32)
  variables = fjt.init_variables(model, x[:1], jax.random.PRNGKey(0))
  _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
  names = {"BatchNorm_0": "bn_in", "BatchNorm_1": "bn_hidden"}
  state_dict = {re.sub(r"BatchNorm_\d", lambda m: names[m[0]], key): value
                for key, value in interop.to_state_dict(variables).items()}
  return model, x, variables, state_dict


def test_safetensors_out_of_module_order_is_an_error_not_a_swap(tmp_path):
  model, x, variables, state_dict = mlp_state_dict_with_renamed_batchnorms()
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables)
  interop.save_file(state_dict, tmp_path / "mlp.pt")
  interop.save_file(state_dict, tmp_path / "mlp.safetensors")
  loaded = interop.load_file(tmp_path / "mlp.safetensors")
  assert isinstance(loaded, interop.SortedStateDict)
  assert list(loaded)[:2] == ["Dense_0.bias", "Dense_0.weight"]
  with pytest.raises(ValueError, match=re.escape(
      "neither names nor shapes decide which of the torch modules ['bn_hidden', 'bn_in'] fills "
      "which of the Flax modules ['BatchNorm_0', 'BatchNorm_1']")):
    interop.from_state_dict(loaded, target)

  # The .pt file keeps the order: an exact import. So does the same file with two rules.
  from_pt, _ = interop.from_state_dict(interop.load_file(tmp_path / "mlp.pt"), target)
  ruled, report = interop.from_state_dict(
      loaded, target, key_map=[(r"bn_in\..*", "BatchNorm_0"), (r"bn_hidden\..*", "BatchNorm_1"),
                               (r"Dense_1\..*", "Dense_1", "linear")])  # Layout: the weight's.
  for imported in (from_pt, ruled):
    jax.tree.map(np.testing.assert_array_equal, imported, variables)
  assert report.matched["bn_in.running_var"] == "batch_stats/BatchNorm_0/var"
  assert report.layouts["Dense_1.weight"] == "linear" and report.layouts["Dense_1.bias"] == "as_is"
  assert report.unused == ("bn_hidden.num_batches_tracked", "bn_in.num_batches_tracked")


def test_torch_layernorms_the_target_lacks_fail_strict_import_naming_every_key():
  torch.manual_seed(0)
  module = nn.Sequential(nn.Linear(8, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 4),
                         nn.LayerNorm(4))
  target = jax.eval_shape(lambda: fjt.MLP(features=(6,), num_classes=4, batch_norm=False).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8)), train=False))
  with pytest.raises(interop.StateDictMismatch, match=re.escape(
      "0 Flax paths got no value: []; 4 torch keys were not used: "
      "['1.weight', '1.bias', '4.weight', '4.bias']")):
    interop.from_state_dict(module, target)
  _, report = interop.from_state_dict(module, target, strict=False)
  assert report.unused == ("1.weight", "1.bias", "4.weight", "4.bias")

  class WithNorms(fnn.Module):
    @fnn.compact
    def __call__(self, x):
      x = fnn.relu(fnn.LayerNorm(epsilon=1e-5)(fnn.Dense(6)(x)))
      return fnn.LayerNorm(epsilon=1e-5)(fnn.Dense(4)(x))

  x = np.random.default_rng(1).normal(size=(3, 8)).astype(np.float32)
  with torch.no_grad():
    for norm in (module[1], module[4]):
      norm.weight.uniform_(0.5, 1.5)
      norm.bias.uniform_(-0.5, 0.5)
  init = WithNorms().init(jax.random.PRNGKey(0), x)
  variables, report = interop.from_state_dict(module, init)
  assert report.matched["4.weight"] == "params/LayerNorm_1/scale"
  np.testing.assert_allclose(WithNorms().apply(variables, x),
                             torch_out(module, torch.from_numpy(x)).numpy(), rtol=0, atol=1e-5)
  # The other way: Flax LayerNorms that the torch model lacks.
  plain = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
  with pytest.raises(interop.StateDictMismatch, match=re.escape(
      "4 Flax paths got no value: ['params/LayerNorm_0/scale', 'params/LayerNorm_0/bias', "
      "'params/LayerNorm_1/scale', 'params/LayerNorm_1/bias']; 0 torch keys")):
    interop.from_state_dict(plain, init)


class Conv1D(nn.Module):
  """Hugging Face's Conv1D: a Linear whose weight is stored (in, out)."""

  def __init__(self, nf, nx):
    super().__init__()
    self.weight = nn.Parameter(torch.randn(nx, nf))
    self.bias = nn.Parameter(torch.randn(nf))

  def forward(self, x):
    return x @ self.weight + self.bias


def test_a_square_weight_is_never_transposed_by_guess():
  transformers = pytest.importorskip("transformers", reason="Hugging Face Conv1D")
  from transformers.pytorch_utils import Conv1D as HFConv1D
  torch.manual_seed(0)
  x = np.random.default_rng(2).normal(size=(3, 64)).astype(np.float32)
  model = fnn.Dense(64)
  target = model.init(jax.random.PRNGKey(0), x)
  for cls, layout in ((HFConv1D, "as_is"), (lambda n, m: nn.Linear(m, n), "linear")):
    module = nn.Sequential(cls(64, 64))
    with pytest.raises(ValueError, match=re.escape(
        "torch key 'weight' is a square (64, 64) weight for Flax path 'params/kernel'")):
      interop.from_state_dict({"weight": module[0].weight, "bias": module[0].bias}, target)
    # The module itself: its class says the layout.
    variables, report = interop.from_state_dict(module[0], target)
    assert report.layouts["weight"] == layout
    np.testing.assert_allclose(model.apply(variables, x),
                               torch_out(module, torch.from_numpy(x)).numpy(), rtol=0, atol=1e-5)
    # Or a rule with the layout.
    by_rule, _ = interop.from_state_dict(module[0].state_dict(), target,
                                         key_map=[(r"weight", "params/kernel", layout),
                                                  (r"bias", "params/bias")])
    jax.tree.map(np.testing.assert_array_equal, by_rule, variables)
  assert transformers.__version__


class AttentionBlock(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.norm = nn.LayerNorm(dim)
    self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

  def forward(self, x):
    y = self.norm(x)
    return x + self.attn(y, y, y, need_weights=False)[0]


class FlaxAttentionBlock(fnn.Module):
  heads: int

  @fnn.compact
  def __call__(self, x):
    y = fnn.LayerNorm(epsilon=1e-5, name="norm")(x)
    return x + fnn.MultiHeadDotProductAttention(self.heads, name="attn")(y)


ATTENTION_RULES = [
    (r"attn\.in_proj_weight", ("params/attn/query/kernel", "params/attn/key/kernel",
                               "params/attn/value/kernel"), "linear"),
    (r"attn\.in_proj_bias", ("params/attn/query/bias", "params/attn/key/bias",
                             "params/attn/value/bias")),
    (r"attn\.out_proj\.weight", "params/attn/out/kernel", "linear"),
    (r"attn\.out_proj\.bias", "params/attn/out/bias"),
]


def test_multihead_attention_imports_through_a_split_rule_and_fuses_back():
  torch.manual_seed(0)
  module = AttentionBlock(16, 4).eval()
  with torch.no_grad():
    module.attn.in_proj_bias.uniform_(-0.5, 0.5)
  x = np.random.default_rng(3).normal(size=(2, 5, 16)).astype(np.float32)
  target = FlaxAttentionBlock(4).init(jax.random.PRNGKey(0), x)
  with pytest.raises(interop.StateDictMismatch, match=r"'attn\.in_proj_weight', 'attn\.in_proj_bias'"):
    interop.from_state_dict(module, target)
  variables, report = interop.from_state_dict(module, target, key_map=ATTENTION_RULES)
  assert report.matched["attn.in_proj_weight"] == (
      "params/attn/query/kernel", "params/attn/key/kernel", "params/attn/value/kernel")
  assert variables["params"]["attn"]["query"]["kernel"].shape == (16, 4, 4)
  assert report.matched["norm.weight"] == "params/norm/scale"  # By name, next to the rules.
  np.testing.assert_allclose(FlaxAttentionBlock(4).apply(variables, x),
                             torch_out(module, torch.from_numpy(x)).numpy(), rtol=0, atol=1e-5)
  fresh = AttentionBlock(16, 4)
  fresh.load_state_dict(interop.to_torch(interop.to_state_dict(variables, like=report)), strict=True)
  assert_state_dicts_equal(fresh.state_dict(), module.state_dict())


def test_tied_weights_are_reported_and_written_back():
  class TiedLM(nn.Module):
    def __init__(self):
      super().__init__()
      self.wte = nn.Embedding(20, 8)
      self.ln = nn.LayerNorm(8)
      self.lm_head = nn.Linear(8, 20, bias=False)
      self.lm_head.weight = self.wte.weight

    def forward(self, ids):
      return self.lm_head(self.ln(self.wte(ids)))

  class FlaxTiedLM(fnn.Module):
    @fnn.compact
    def __call__(self, ids):
      wte = fnn.Embed(20, 8, name="wte")
      return wte.attend(fnn.LayerNorm(epsilon=1e-5, name="ln")(wte(ids)))

  torch.manual_seed(0)
  module = TiedLM()
  ids = np.arange(12, dtype=np.int32).reshape(2, 6)
  variables, report = interop.from_state_dict(
      module, FlaxTiedLM().init(jax.random.PRNGKey(0), ids))
  assert report.tied == {"lm_head.weight": "wte.weight"} and report.unused == ()
  np.testing.assert_allclose(FlaxTiedLM().apply(variables, ids),
                             torch_out(module, torch.from_numpy(ids).long()).numpy(),
                             rtol=0, atol=1e-5)
  state_dict = interop.to_state_dict(variables, like=report)
  assert list(state_dict) == ["wte.weight", "ln.weight", "ln.bias", "lm_head.weight"]
  fresh = TiedLM()
  fresh.load_state_dict(interop.to_torch(state_dict), strict=True)
  assert_state_dicts_equal(fresh.state_dict(), module.state_dict())


def test_truncated_and_oversized_weight_files_end_in_one_line_errors(tmp_path):
  interop.save_file({"w": np.ones((4, 4), np.float32)}, tmp_path / "w.safetensors")
  data = (tmp_path / "w.safetensors").read_bytes()
  cases = {"cut.safetensors": data[:-10], "long.safetensors": data + b"\0" * 100,
           "header.safetensors": struct.pack("<Q", 2**40) + data[8:]}
  torch.save({"w": torch.ones(100)}, tmp_path / "w.pt")
  cases["cut.pt"] = (tmp_path / "w.pt").read_bytes()[:300]
  for name, content in cases.items():
    (tmp_path / name).write_bytes(content)
    with pytest.raises(interop.WeightFileError) as error:
      interop.load_file(tmp_path / name)
    message = str(error.value)
    assert "\n" not in message and message.startswith(repr(str(tmp_path / name)))
    assert re.search(r"is not a readable (\.safetensors|PyTorch) file \(truncated", message)


def test_convert_cli_ends_a_truncated_file_in_one_line(tmp_path):
  torch.save({"w": torch.ones(100)}, tmp_path / "w.pt")
  (tmp_path / "cut.pt").write_bytes((tmp_path / "w.pt").read_bytes()[:300])
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, os.path.join(root, "scripts", "convert.py"), str(tmp_path / "cut.pt"),
       str(tmp_path / "out"), "--config", os.path.join(root, "configs", "digits_mlp.py")],
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.startswith(f"error: {str(tmp_path / 'cut.pt')!r} is not a readable "
                                  f"PyTorch file (truncated or corrupt)")
  assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr



def test_a_sorted_target_pairs_the_resnet_stem_wrongly_and_says_why(resnet):
  model, x, _, module, _ = resnet
  sorted_target = jax.eval_shape(lambda: fjt.init_variables(model, x[:1], jax.random.PRNGKey(0)))
  assert list(sorted_target["params"])[0] == "BasicBlock_0"
  with pytest.raises(ValueError, match=r"'conv1\.weight' has shape \(64, 3, 7, 7\).*paired with "
                                       r"Flax module 'BasicBlock_0/Conv_0' by order.*abstract_variables"):
    interop.from_state_dict(module, sorted_target)
