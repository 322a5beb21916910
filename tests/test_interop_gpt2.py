"""Hugging Face GPT-2 <-> fjt.models.GPT with no key_map argument (issue 13)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="interop tests need PyTorch (the interop extra)")
transformers = pytest.importorskip("transformers", reason="GPT-2 interop needs transformers")

from fjt.interop import torch as interop  # noqa: E402
from fjt.models import GPT  # noqa: E402


@pytest.fixture(scope="module")
def gpt2():
  """A tiny random GPT2LMHeadModel (2 layers, 64 wide, vocab 1000) after 3 AdamW steps."""
  transformers.logging.set_verbosity_error()
  config = transformers.GPT2Config(vocab_size=1000, n_positions=32, n_embd=64, n_layer=2,
                                   n_head=4, bos_token_id=0, eos_token_id=0)
  torch.manual_seed(0)
  module = transformers.GPT2LMHeadModel(config)
  ids = torch.randint(0, 1000, (2, 16))
  opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
  module.train()
  for _ in range(3):
    loss = module(ids, labels=ids).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
  model = GPT(vocab_size=1000, block_size=32, num_layers=2, num_heads=4, embed_dim=64,
              dropout_rate=0.0)
  x = ids.numpy().astype(np.int32)
  return config, module.eval(), ids, model, x, interop.abstract_variables(model, x[:1])


def hf_logits(module, ids):
  with torch.no_grad():
    return module.eval()(ids).logits.numpy()


@pytest.mark.parametrize("as_state_dict", [False, True])
def test_gpt2_imports_into_fjt_gpt_and_exports_back_strictly(gpt2, as_state_dict):
  config, module, ids, model, x, target = gpt2
  source = module.state_dict() if as_state_dict else module
  variables, report = interop.from_state_dict(source, target)
  assert report.unmatched == () and report.unused == ()
  assert report.tied == {"lm_head.weight": "transformer.wte.weight"}
  assert report.layouts["transformer.h.0.attn.c_proj.weight"] == "as_is"  # Conv1D, square.
  assert report.matched["transformer.h.1.mlp.c_fc.weight"] == "params/h_1/mlp/c_fc/kernel"
  logits = np.asarray(model.apply(variables, x, train=False))
  expected = hf_logits(module, ids)
  np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)

  state_dict = interop.to_state_dict(variables, like=report)
  assert list(state_dict) == list(module.state_dict())
  fresh = transformers.GPT2LMHeadModel(config)
  fresh.load_state_dict(interop.to_torch(state_dict), strict=True)
  for key, value in module.state_dict().items():
    assert torch.equal(fresh.state_dict()[key], value), key
  np.testing.assert_array_equal(hf_logits(fresh, ids), expected)


def test_gpt2_safetensors_matches_by_the_default_key_map_names(gpt2, tmp_path):
  _, module, ids, model, x, target = gpt2
  state_dict = {k: v for k, v in module.state_dict().items() if k != "lm_head.weight"}
  interop.save_file(state_dict, tmp_path / "model.safetensors")  # As save_pretrained: no tie.
  variables, report = interop.from_state_dict(interop.load_file(tmp_path / "model.safetensors"),
                                              target)
  assert report.unmatched == () and report.unused == ()
  np.testing.assert_allclose(np.asarray(model.apply(variables, x, train=False)),
                             hf_logits(module, ids), rtol=0, atol=1e-4)
  # Without the default map, names do not match and order is unknown: an error, no guess.
  with pytest.raises(ValueError, match=r"keeps no order|square"):
    interop.from_state_dict(interop.load_file(tmp_path / "model.safetensors"), target, key_map=[])
