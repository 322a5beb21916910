"""LoRA on parameter trees (fjt.lora), LoRA runs (config keys lora.*) and the PEFT export."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_digits_config

import fjt
from fjt import checkpoint
from fjt.config import ConfigError
from fjt.interop import convert
from fjt.models import GPT
from fjt.tree import flatten, to_nested_dict

GPT_TARGETS = (r"(attn|mlp)/c_\w+/kernel",)


def _tiny_gpt():
  return GPT(vocab_size=50, block_size=16, num_layers=2, num_heads=2, embed_dim=16,
             dropout_rate=0.0)


def test_merge_is_w_plus_alpha_over_r_a_b_exactly():
  # Dyadic values: every product and sum below is exact in float32, in any order.
  rng = np.random.default_rng(0)
  dyadic = lambda *shape: (rng.integers(-8, 9, shape) / 8).astype(np.float32)
  params = {"Dense_0": {"kernel": dyadic(6, 5), "bias": dyadic(5)},
            "Dense_1": {"kernel": dyadic(5, 3), "bias": dyadic(3)}}
  adapters = {"Dense_0": {"kernel": {"a": dyadic(6, 2), "b": dyadic(2, 5)}}}
  merged = fjt.lora.merge(params, adapters, alpha=8.0)
  expected = params["Dense_0"]["kernel"] + 8.0 / 2 * (adapters["Dense_0"]["kernel"]["a"]
                                                      @ adapters["Dense_0"]["kernel"]["b"])
  np.testing.assert_array_equal(np.asarray(merged["Dense_0"]["kernel"]), expected)
  for path in ("Dense_0/bias", "Dense_1/kernel", "Dense_1/bias"):
    assert flatten(merged)[path] is flatten(params)[path]  # Untouched: the same array.
  assert fjt.lora.count(adapters) == 2 * (6 + 5)


def test_initial_adapters_are_a_no_op_bitwise():
  model = _tiny_gpt()
  x = jnp.arange(32, dtype=jnp.int32).reshape(2, 16) % 50
  params = fjt.init_variables(model, x[:1], jax.random.PRNGKey(0))["params"]
  adapters = fjt.lora.init(params, rank=4, targets=GPT_TARGETS, key=jax.random.PRNGKey(1))
  kernels = sorted({p[:-2] for p in flatten(adapters)})
  assert kernels == [f"h_{i}/{m}" for i in range(2) for m in
                     ("attn/c_attn/kernel", "attn/c_proj/kernel", "mlp/c_fc/kernel",
                      "mlp/c_proj/kernel")]
  a, b = adapters["h_0"]["mlp"]["c_fc"]["kernel"]["a"], adapters["h_0"]["mlp"]["c_fc"]["kernel"]["b"]
  assert a.shape == (16, 4) and b.shape == (4, 64)
  assert float(jnp.max(jnp.abs(a))) <= 1 / 16 ** 0.5 and float(jnp.std(a)) > 0  # PEFT's bound.
  assert not np.any(np.asarray(b))
  merged = fjt.lora.merge(params, adapters, alpha=16.0)
  for path, leaf in flatten(params).items():
    np.testing.assert_array_equal(np.asarray(flatten(merged)[path]), np.asarray(leaf), path)
  apply = jax.jit(model.apply)  # One compilation for both.
  np.testing.assert_array_equal(apply({"params": merged}, x), apply({"params": params}, x))


def test_a_bad_target_is_one_line_naming_it():
  params = fjt.init_variables(_tiny_gpt(), jnp.zeros((1, 16), jnp.int32),
                              jax.random.PRNGKey(0))["params"]
  key = jax.random.PRNGKey(0)
  with pytest.raises(ConfigError, match=r"pattern 'q_proj' matches no parameter") as e:
    fjt.lora.init(params, rank=2, targets=("c_fc/kernel", "q_proj"), key=key)
  assert "\n" not in str(e.value)
  with pytest.raises(ConfigError, match=r"h_0/attn/c_attn/bias has shape \(48,\), not a 2-D "
                                        r"kernel") as e:
    fjt.lora.init(params, rank=2, targets=("attn/c_attn",), key=key)
  assert "\n" not in str(e.value)
  config = tiny_digits_config("mlp")
  config.lora.rank = 2
  with pytest.raises(ConfigError, match="config key 'lora.targets'"):
    fjt.RunOptions.from_config(config)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  """A tiny digits MLP trained 20 steps: the base the LoRA runs start from."""
  workdir = str(tmp_path_factory.mktemp("base"))
  config = _no_averaging(tiny_digits_config("mlp", steps=20))
  state, _ = fjt.train.fit(config, workdir, progress=False)
  return workdir, jax.device_get(state.params)


def _no_averaging(config):
  config.ema.decay = 0.0
  config.swa.every = 0
  return config


def _lora_config(base: str, steps: int):
  config = _no_averaging(tiny_digits_config("mlp", steps=steps))
  config.optimizer.schedule = "constant"  # The same steps whatever train.steps says.
  config.optimizer.name = "adamw"
  for key in ("momentum", "nesterov"):
    del config.optimizer[key]
  config.checkpoint.every_steps = 5
  config.init_from = base
  config.lora.rank, config.lora.alpha, config.lora.targets = 2, 4.0, (r"Dense_\d/kernel",)
  return config


def test_a_lora_run_trains_adapters_only_keeps_the_base_and_resumes_bitwise(base_run, tmp_path):
  base, base_params = base_run
  straight, summary = fjt.train.fit(_lora_config(base, 16), str(tmp_path / "straight"),
                                    progress=False)
  # The base is bitwise as loaded; the optimizer state holds the adapters' moments only.
  for path, leaf in flatten(base_params).items():
    np.testing.assert_array_equal(np.asarray(flatten(straight.base)[path]), leaf, path)
  adapter_shapes = {np.shape(x) for x in jax.tree.leaves(straight.params)}
  assert adapter_shapes == {(64, 2), (2, 32), (32, 2), (2, 10)}
  assert {np.shape(x) for x in jax.tree.leaves(straight.opt_state) if np.ndim(x)} == adapter_shapes
  assert np.any(np.asarray(straight.params["Dense_1"]["kernel"]["b"]))  # The adapters trained.
  assert summary["eval"]["accuracy"] > 0

  # Stopped at step 8 and resumed to 16: the same state bit for bit.
  resumed_dir = str(tmp_path / "resumed")
  fjt.train.fit(_lora_config(base, 8), resumed_dir, progress=False)
  resumed, _ = fjt.train.fit(_lora_config(base, 16), resumed_dir, progress=False)
  for (path, a), b in zip(flatten(to_nested_dict(straight)).items(),
                          jax.tree.leaves(to_nested_dict(resumed))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), path)

  # scripts/convert.py --lora: the merged model and the adapters alone, as fjt checkpoints.
  merged_dir, adapters_dir = str(tmp_path / "merged"), str(tmp_path / "adapters")
  convert.export_lora(str(tmp_path / "straight"), merged_dir, "merged")
  convert.export_lora(str(tmp_path / "straight"), adapters_dir, "adapters")
  merged = checkpoint.load_variables(merged_dir)
  expected = fjt.lora.merge(straight.base, straight.params, 4.0)
  for path, leaf in flatten(expected).items():
    np.testing.assert_array_equal(np.asarray(flatten(merged["params"])[path]), leaf, path)
  for path, leaf in flatten(checkpoint.load(adapters_dir)).items():
    np.testing.assert_array_equal(leaf, np.asarray(flatten(straight.params)[path]), path)
  model, variables, _ = fjt.runs.load_model(str(tmp_path / "straight"))  # As sample.py loads.
  np.testing.assert_array_equal(np.asarray(variables["params"]["Dense_0"]["kernel"]),
                                np.asarray(expected["Dense_0"]["kernel"]))
  with pytest.raises(ValueError, match="MLP has no Hugging Face twin"):
    convert.export_lora(str(tmp_path / "straight"), str(tmp_path / "peft"), "peft")


def test_peft_loads_the_exported_adapters_onto_hf_gpt2_with_the_same_logits(tmp_path):
  torch = pytest.importorskip("torch", reason="the PEFT round trip needs PyTorch")
  transformers = pytest.importorskip("transformers", reason="the PEFT round trip needs transformers")
  peft = pytest.importorskip("peft", reason="the PEFT round trip needs peft (pip install peft)")
  from fjt.interop import peft as fjt_peft
  from fjt.interop import torch as interop

  transformers.logging.set_verbosity_error()
  config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                   bos_token_id=0, eos_token_id=0)
  torch.manual_seed(0)
  module = transformers.GPT2LMHeadModel(config).eval()
  model = _tiny_gpt()
  ids = np.arange(32, dtype=np.int32).reshape(2, 16) * 7 % 50
  variables, _ = interop.from_state_dict(module, interop.abstract_variables(model, ids[:1]))
  adapters = fjt.lora.init(variables["params"], rank=4, targets=GPT_TARGETS,
                           key=jax.random.PRNGKey(0))
  # Trained-looking adapters: b nonzero, so the update is not zero.
  adapters = jax.tree_util.tree_map_with_path(
      lambda p, x: jax.random.normal(jax.random.PRNGKey(len(str(p))), x.shape) * 0.2
      if p[-1].key == "b" else x, adapters)
  merged = fjt.lora.merge(variables["params"], adapters, alpha=8.0)
  apply = jax.jit(model.apply)
  logits = np.asarray(apply({"params": merged}, ids))
  base_logits = np.asarray(apply({"params": variables["params"]}, ids))
  assert np.max(np.abs(logits - base_logits)) > 1e-2  # The adapters matter.

  keys = fjt_peft.save_adapters(str(tmp_path), adapters, alpha=8.0,
                                modules=fjt_peft.peft_modules(model))
  assert keys[:2] == ["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight",
                      "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
  saved = json.loads((tmp_path / "adapter_config.json").read_text())
  assert saved["r"] == 4 and saved["lora_alpha"] == 8.0 and saved["fan_in_fan_out"] is True
  peft_model = peft.PeftModel.from_pretrained(module, str(tmp_path)).eval()
  with torch.no_grad():
    hf_logits = peft_model(torch.from_numpy(ids).long()).logits.numpy()
  np.testing.assert_allclose(hf_logits, logits, rtol=0, atol=1e-4)


def test_peft_loads_llama_adapters_onto_hf_llama_with_the_same_logits(tmp_path):
  torch = pytest.importorskip("torch", reason="the PEFT round trip needs PyTorch")
  transformers = pytest.importorskip("transformers", reason="the PEFT round trip needs transformers")
  peft = pytest.importorskip("peft", reason="the PEFT round trip needs peft (pip install peft)")
  from fjt.interop import llama as hf_llama
  from fjt.interop import peft as fjt_peft

  transformers.logging.set_verbosity_error()
  config = transformers.LlamaConfig(
      vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
      tie_word_embeddings=False)
  torch.manual_seed(0)
  module = transformers.LlamaForCausalLM(config).eval()
  model = hf_llama.module_from_config(module.config.to_dict())
  variables = hf_llama.variables_from_state_dict(
      {k: v.numpy() for k, v in module.state_dict().items()}, model)
  adapters = fjt.lora.init(variables["params"], rank=2, targets=(r"_proj/kernel",),
                           key=jax.random.PRNGKey(0))
  adapters = jax.tree_util.tree_map_with_path(  # Trained-looking: b nonzero.
      lambda p, x: jax.random.normal(jax.random.PRNGKey(len(str(p))), x.shape) * 0.2
      if p[-1].key == "b" else x, adapters)
  ids = np.arange(32, dtype=np.int32).reshape(2, 16) * 7 % 61
  with jax.default_matmul_precision("highest"):
    logits = np.asarray(jax.jit(model.apply)(
        {"params": fjt.lora.merge(variables["params"], adapters, alpha=4.0)}, ids))
  fjt_peft.save_adapters(str(tmp_path), adapters, alpha=4.0, modules=fjt_peft.peft_modules(model))
  assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is False
  peft_model = peft.PeftModel.from_pretrained(module, str(tmp_path)).eval()
  with torch.no_grad():
    hf_logits = peft_model(torch.from_numpy(ids).long()).logits.numpy()
  np.testing.assert_allclose(hf_logits, logits, rtol=0, atol=1e-4)


def test_new_text_is_read_with_a_runs_vocabulary(tmp_path):
  from fjt.data import tokens

  (tmp_path / "text").mkdir()
  (tmp_path / "text" / "a.txt").write_text("the cat sat on the mat\nthe dog sat\n" * 5)
  vocab = ["<s>", "<unk>", "the", "sat", "cat"]  # A run's words in id order.
  meta = tokens.prepare_text([str(tmp_path / "text")], str(tmp_path / "tok"), vocab=vocab)
  assert meta["vocab_size"] == 5 and meta["tokenizer_kind"] == "word"
  train = np.fromfile(tmp_path / "tok" / "train.bin", np.uint16)
  assert train[:8].tolist() == [0, 2, 4, 3, 1, 2, 1, 2]  # <s> the cat sat on the mat the
