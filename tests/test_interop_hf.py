"""Hugging Face folders both ways (issue 24): files written by transformers itself, the hub's
old layout written by hand, and fjt's export loaded back by transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="Hugging Face interop tests need PyTorch")
transformers = pytest.importorskip("transformers", reason="Hugging Face interop tests need transformers")

from fjt.interop import hf  # noqa: E402
from fjt.interop import torch as interop  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
  """A tiny GPT2LMHeadModel (2 layers, 32 wide, vocab 100), saved by transformers as one
  safetensors file and as shards with an index."""
  transformers.logging.set_verbosity_error()
  config = transformers.GPT2Config(vocab_size=100, n_positions=16, n_embd=32, n_layer=2, n_head=2)
  torch.manual_seed(0)
  module = transformers.GPT2LMHeadModel(config).eval()
  with torch.no_grad():  # Non-zero biases and norms, so a dropped tensor shows in the logits.
    for p in module.parameters():
      p.add_(0.05 * torch.randn_like(p))
  root = tmp_path_factory.mktemp("hf")
  module.save_pretrained(root / "single")
  module.save_pretrained(root / "sharded", max_shard_size="20KB")
  ids = torch.randint(0, 100, (2, 12))
  with torch.no_grad():
    logits = module(ids).logits.numpy()
  return module, root, ids, logits


def fjt_logits(model, variables, ids):
  return np.asarray(model.apply(variables, ids.numpy().astype(np.int32), train=False))


@pytest.mark.parametrize("folder", ["single", "sharded"])
def test_from_pretrained_reads_what_transformers_wrote(gpt2, folder):
  module, root, ids, logits = gpt2
  if folder == "sharded":
    index = json.loads((root / folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
  model, variables, report = hf.from_pretrained(root / folder)
  assert (model.vocab_size, model.block_size, model.num_layers, model.embed_dim) == (100, 16, 2, 32)
  assert report.model_type == "gpt2" and report.prefix == "transformer." and report.dropped == ()
  np.testing.assert_allclose(fjt_logits(model, variables, ids), logits, rtol=0, atol=1e-4)


def test_hub_old_layout_bin_with_mask_buffers(gpt2, tmp_path):
  """The hub's gpt2 files: GPT2Model keys (no ``transformer.``), causal-mask buffers beside the
  weights, ``pytorch_model.bin`` as ``torch.save`` wrote it (transformers 5 writes no .bin)."""
  module, root, ids, logits = gpt2
  state_dict = {k.removeprefix("transformer."): v for k, v in module.state_dict().items()
                if k != "lm_head.weight"}
  for i in range(2):
    state_dict[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 16, 16, dtype=torch.uint8))
    state_dict[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
  torch.save(state_dict, tmp_path / "pytorch_model.bin")
  (tmp_path / "config.json").write_text((root / "single" / "config.json").read_text())
  model, variables, report = hf.from_pretrained(tmp_path)
  assert report.prefix == "" and len(report.dropped) == 4
  assert "h.0.attn.masked_bias" in report.dropped and "dropped 4 non-weight buffers" in str(report)
  np.testing.assert_allclose(fjt_logits(model, variables, ids), logits, rtol=0, atol=1e-4)
  # The weight file itself, config.json beside it: the same.
  _, again, _ = hf.from_pretrained(tmp_path / "pytorch_model.bin")
  np.testing.assert_array_equal(fjt_logits(model, again, ids), fjt_logits(model, variables, ids))


def test_save_pretrained_loads_into_transformers_cleanly(gpt2, tmp_path):
  module, root, ids, logits = gpt2
  model, variables, _ = hf.from_pretrained(root / "single")
  keys = hf.save_pretrained(model, variables, tmp_path / "out")
  assert "lm_head.weight" not in keys and "transformer.h.1.attn.c_attn.weight" in keys
  loaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                                   output_loading_info=True)
  assert type(loaded).__name__ == "GPT2LMHeadModel"
  assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
  assert info["mismatched_keys"] == set() and info["error_msgs"] == []
  with torch.no_grad():
    np.testing.assert_allclose(loaded.eval()(ids).logits.numpy(), logits, rtol=0, atol=1e-4)
  # Without a report or key map, to_state_dict of GPT variables uses the twin's names.
  state_dict = interop.to_state_dict(variables)
  assert set(state_dict) == set(module.state_dict()) - {"lm_head.weight"}
  for key, value in state_dict.items():
    np.testing.assert_array_equal(value, module.state_dict()[key].numpy(), err_msg=key)


def test_export_honours_a_key_map_layout():
  variables = {"params": {"Dense_0": {"kernel": np.arange(6.0).reshape(2, 3)}}}
  as_is = interop.to_state_dict(variables, key_map=[(r"params/Dense_0/kernel", "w", "as_is")])
  linear = interop.to_state_dict(variables, key_map=[(r"params/Dense_0/kernel", "w", "linear")])
  np.testing.assert_array_equal(as_is["w"], variables["params"]["Dense_0"]["kernel"])
  np.testing.assert_array_equal(linear["w"], variables["params"]["Dense_0"]["kernel"].T)


def test_unknown_model_type_names_the_supported_ones(gpt2, tmp_path):
  _, root, _, _ = gpt2
  config = json.loads((root / "single" / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
  with pytest.raises(ValueError, match=r"model_type 'bert' is not supported; supported: .*gpt2"):
    hf.from_pretrained(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
  with pytest.raises(ValueError, match="activation_function"):
    hf.from_pretrained(tmp_path)


def test_convert_script_both_ways(gpt2, tmp_path):
  """scripts/convert.py --from a folder -> an fjt checkpoint; --to hf back to a folder."""
  module, root, ids, logits = gpt2
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  script = os.path.join(ROOT, "scripts", "convert.py")
  done = subprocess.run([sys.executable, script, "--from", str(root / "single"), str(tmp_path / "ck")],
                        capture_output=True, text=True, env=env)
  assert done.returncode == 0, done.stderr
  done = subprocess.run([sys.executable, script, str(tmp_path / "ck"), "--to", "hf",
                         str(tmp_path / "back")], capture_output=True, text=True, env=env)
  assert done.returncode == 0, done.stderr
  loaded, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back",
                                                              output_loading_info=True)
  assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
  with torch.no_grad():
    np.testing.assert_allclose(loaded.eval()(ids).logits.numpy(), logits, rtol=0, atol=1e-4)


def test_torchvision_named_resnet_safetensors_loads_by_its_names(tmp_path):
  """A .safetensors file keeps no order, but torchvision's ResNet names fix it: no key_map."""
  from fjt.interop.torch_models import torch_module
  from fjt.models.resnet import ResNet
  model = ResNet(stage_sizes=(2, 1), widths=(4, 8), stem="small", stem_width=4, num_classes=3)
  x = np.random.default_rng(0).normal(size=(2, 6, 6, 2)).astype(np.float32)
  module = torch_module(model, x.shape[1:]).eval()
  with torch.no_grad():  # Statistics other than the init's, so a swapped BatchNorm shows.
    for name, buffer in module.named_buffers():
      if "running" in name:
        buffer.add_(torch.rand_like(buffer))
  interop.save_file(module.state_dict(), tmp_path / "resnet.safetensors")
  source = interop.load_file(tmp_path / "resnet.safetensors")
  assert isinstance(source, interop.SortedStateDict)
  variables, report = interop.from_state_dict(source, interop.abstract_variables(model, x[:1]))
  assert report.matched["layer2.0.downsample.0.weight"] == "params/BasicBlock_2/Conv_2/kernel"
  with torch.no_grad():
    expected = module(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  np.testing.assert_allclose(np.asarray(model.apply(variables, x, train=False)), expected,
                             rtol=0, atol=1e-4)
  # Names that decide nothing still never match by order.
  renamed = interop.SortedStateDict((f"m{i}.{k}", v) for i, (k, v) in enumerate(source.items()))
  with pytest.raises(ValueError):
    interop.from_state_dict(renamed, interop.abstract_variables(model, x[:1]))


def test_another_architecture_into_gpt_names_what_is_supported():
  from fjt.models import GPT
  config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=2, max_position_embeddings=16)
  model = GPT(vocab_size=100, block_size=16, num_layers=2, num_heads=2, embed_dim=32)
  target = interop.abstract_variables(model, np.zeros((1, 1), np.int32))
  with pytest.raises(ValueError) as error:
    interop.from_state_dict(transformers.LlamaForCausalLM(config), target)
  message = str(error.value)
  assert "another architecture than the target" in message and "model types: gpt2" in message
  assert "abstract_variables" not in message


def test_resnet_exports_with_torchvision_names_by_default():
  from fjt.interop.torch_models import torch_module
  from fjt.models.resnet import ResNet
  for block in ("basic", "bottleneck"):
    model = ResNet(stage_sizes=(2, 1), widths=(4, 8), block=block, stem="small", stem_width=4,
                   num_classes=3)
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 2)).astype(np.float32)
    variables = jax_variables(model, x)
    module = torch_module(model, x.shape[1:]).eval()
    state_dict = interop.to_state_dict(variables)  # No report, no key map.
    assert list(state_dict) == list(module.state_dict())
    module.load_state_dict(interop.to_torch(state_dict), strict=True)
    with torch.no_grad():
      expected = module(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(np.asarray(model.apply(variables, x, train=False)), expected,
                               rtol=0, atol=1e-4)


def jax_variables(model, x):
  import jax
  import fjt
  return fjt.init_variables(model, x[:1], jax.random.PRNGKey(0))


def test_init_from_a_hugging_face_folder_fills_the_state_and_names_a_mismatch(gpt2):
  """``init_from`` (and so a LoRA run's base) may be a Hugging Face folder: read in memory by
  from_pretrained, loaded with the checkpoint's report and rules."""
  import jax
  import optax
  import fjt
  module, root, ids, logits = gpt2
  model, _, _ = hf.from_pretrained(root / "single")
  state = fjt.create_train_state(model, optax.sgd(0.1), np.zeros((1, 4), np.int32),
                                 jax.random.PRNGKey(1))
  assert hf.is_pretrained(root / "single") and not hf.is_pretrained(root)
  loaded, report = fjt.train.init_from_checkpoint(state, str(root / "single"))
  assert report.missing == [] and report.mismatched == [] and len(report.loaded) > 10
  np.testing.assert_allclose(fjt_logits(model, {"params": loaded.params}, ids), logits,
                             rtol=0, atol=1e-4)
  wider = model.clone(embed_dim=64)
  state = fjt.create_train_state(wider, optax.sgd(0.1), np.zeros((1, 4), np.int32),
                                 jax.random.PRNGKey(1))
  with pytest.raises(fjt.checkpoint.CheckpointMismatchError, match=r"single: shapes differ at"):
    fjt.train.init_from_checkpoint(state, str(root / "single"))
