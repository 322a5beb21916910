"""Llama: Hugging Face's LlamaForCausalLM both ways, cached decoding, remat, dtypes (tiny sizes)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fjt.generate import generate
from fjt.interop import llama as hf_llama
from fjt.models import GPT, Llama, create_model
from fjt.models.transformer import init_cache
from fjt.tree import unbox

TINY = {"name": "llama", "vocab_size": 61, "block_size": 16, "num_layers": 2, "num_heads": 4,
        "num_kv_heads": 2, "embed_dim": 32, "mlp_dim": 48, "rope_theta": 500.0,
        "rms_norm_eps": 1e-5}


@pytest.fixture(autouse=True)
def _full_precision():
  with jax.default_matmul_precision("highest"):  # Exact comparisons on a GPU too (no TF32).
    yield


def tiny_llama(**overrides) -> tuple[Llama, dict]:
  model = create_model({**TINY, **overrides})
  params = unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))["params"]
  return model, params


def test_rotary_embedding_is_hugging_faces_rotate_half():
  from fjt.models.llama import apply_rotary
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 3, 2, 4))
  y = apply_rotary(x, jnp.arange(3), 100.0)
  # Position p rotates the pairs (x[j], x[j + 2]) by angle p * 100^(-j / 2), j = 0, 1.
  for p in range(3):
    for j in range(2):
      a = p * 100.0 ** (-j / 2)
      c, s = np.cos(a), np.sin(a)
      np.testing.assert_allclose(y[0, p, :, j], c * x[0, p, :, j] - s * x[0, p, :, j + 2], atol=1e-6)
      np.testing.assert_allclose(y[0, p, :, j + 2], s * x[0, p, :, j] + c * x[0, p, :, j + 2],
                                 atol=1e-6)


@pytest.fixture(scope="module")
def hf_model():
  torch = pytest.importorskip("torch", reason="Llama interop tests need PyTorch (the interop extra)")
  transformers = pytest.importorskip("transformers", reason="Llama interop needs transformers")
  transformers.logging.set_verbosity_error()
  config = transformers.LlamaConfig(
      vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
      rms_norm_eps=1e-5, rope_theta=500.0, tie_word_embeddings=False)
  torch.manual_seed(0)
  module = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():  # Norm scales away from 1, so a missed scale shows.
    for name, p in module.named_parameters():
      if name.endswith("norm.weight"):
        p.uniform_(0.5, 1.5)
  return torch, transformers, module


def test_hugging_face_llama_both_ways_with_grouped_query_attention(hf_model):
  torch, transformers, module = hf_model
  model = hf_llama.module_from_config(module.config.to_dict())
  assert (model.num_kv_heads, model.mlp_dim, model.rope_theta, model.tie_embeddings) == (2, 48, 500.0, False)
  state_dict = {k: v.numpy() for k, v in module.state_dict().items()}
  variables = hf_llama.variables_from_state_dict(state_dict, model)
  ids = np.random.default_rng(0).integers(0, 61, (2, 16))
  with torch.no_grad():
    expected = module(torch.tensor(ids)).logits.numpy()
  logits = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(ids, jnp.int32)))
  np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)

  back = hf_llama.state_dict_from_variables(variables, model)
  assert list(back) == list(state_dict)
  for key in state_dict:
    np.testing.assert_array_equal(back[key], state_dict[key], err_msg=key)
  config = hf_llama.config_from_module(model)
  fresh = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
  with torch.no_grad():
    np.testing.assert_array_equal(fresh(torch.tensor(ids)).logits.numpy(), expected)

  # Keys without the base model's prefix (LlamaModel's), and a stale rotary buffer, load too.
  bare = {k.removeprefix("model."): v for k, v in state_dict.items()}
  bare["layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
  jax.tree.map(np.testing.assert_array_equal,
               hf_llama.variables_from_state_dict(bare, model), variables)
  with pytest.raises(ValueError, match=r"missing keys \['model.norm.weight'\]"):
    hf_llama.variables_from_state_dict({k: v for k, v in state_dict.items()
                                        if k != "model.norm.weight"}, model)
  with pytest.raises(ValueError, match="'model.layers.1.self_attn.k_proj.weight': shape"):
    hf_llama.variables_from_state_dict(
        {**state_dict, "model.layers.1.self_attn.k_proj.weight": np.zeros((32, 32), np.float32)},
        model)
  with pytest.raises(ValueError, match="key 'attention_bias'"):
    hf_llama.module_from_config({**module.config.to_dict(), "attention_bias": True})


def test_a_tied_llama_exports_without_lm_head_and_matches_hugging_face(hf_model):
  torch, transformers, _ = hf_model
  model, params = tiny_llama(tie_embeddings=True)
  state_dict = hf_llama.state_dict_from_variables({"params": params}, model)
  assert "lm_head.weight" not in state_dict
  config = hf_llama.config_from_module(model)
  assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
  module = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
  missing, unexpected = module.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()},
                                               strict=False)
  assert unexpected == [] and set(missing) <= {"lm_head.weight"}
  ids = np.arange(24).reshape(2, 12) % 61
  with torch.no_grad():
    expected = module(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(jax.jit(model.apply)({"params": params}, jnp.asarray(ids, jnp.int32)),
                             expected, rtol=0, atol=1e-4)
  full = {k: v.numpy() for k, v in module.state_dict().items()}  # Lists the tied lm_head.
  again = hf_llama.variables_from_state_dict(full, model)
  jax.tree.map(np.testing.assert_array_equal, again["params"], params)


def test_cached_decode_gives_the_logits_of_the_full_model_on_the_growing_sequence():
  model, params = tiny_llama()
  x = jax.random.randint(jax.random.PRNGKey(3), (2, 16), 0, 61)
  forward = jax.jit(lambda seq: model.apply({"params": params}, seq))
  full = forward(x)
  decode = jax.jit(lambda cache, tokens: model.clone(decode=True).apply(
      {"params": params, "cache": cache}, tokens, mutable=["cache"]))
  cache = init_cache(model, 2)
  assert cache["model"]["layers_0"]["self_attn"]["cached_key"].shape == (2, 16, 2, 8)  # Grouped.
  logits, upd = decode(cache, x[:, :5])  # The prompt at once, then one token per call.
  pieces = [logits]
  for t in range(5, 16):
    logits, upd = decode(upd["cache"], x[:, t:t + 1])
    pieces.append(logits)
  np.testing.assert_allclose(np.concatenate(pieces, 1), full, rtol=0, atol=5e-6)
  # generate: greedy tokens are the argmax of the full model on the growing sequence (causal:
  # the logits at t of the zero-padded sequence are those of the sequence up to t).
  out = generate(model, params, x[:, :3], 5, jax.random.PRNGKey(0), temperature=0.0)
  seq = jnp.zeros((2, 8), jnp.int32).at[:, :3].set(x[:, :3])
  for t in range(3, 8):
    seq = seq.at[:, t].set(jnp.argmax(forward(seq)[:, t - 1], -1).astype(jnp.int32))
  np.testing.assert_array_equal(out, seq)


@pytest.mark.parametrize("name", ["llama", "gpt"])
def test_remat_gives_the_same_loss_and_gradients(name):
  overrides = {} if name == "llama" else {"name": "gpt", "dropout_rate": 0.1}
  config = {**TINY, **overrides} if name == "llama" else {
      "name": "gpt", "vocab_size": 61, "block_size": 16, "num_layers": 2, "num_heads": 2,
      "embed_dim": 16, "dropout_rate": 0.1}
  model = create_model({**config, "remat": "none"})
  remat = create_model({**config, "remat": "blocks"})
  x = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 61)
  params = unbox(model.init(jax.random.PRNGKey(0), x))["params"]
  remat_params = unbox(remat.init(jax.random.PRNGKey(0), x))["params"]
  jax.tree.map(np.testing.assert_array_equal, params, remat_params)  # Same names and values.

  def loss(p, m):
    logits = m.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.roll(x, -1, 1)).mean()

  grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  (l0, g0), (l1, g1) = grad(params, model), grad(params, remat)
  assert float(l0) == float(l1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-7), g0, g1)
  with pytest.raises(ValueError, match="model.remat"):
    create_model({**config, "remat": "all"}).init(jax.random.PRNGKey(0), x)


def test_bf16_compute_keeps_param_dtype_and_float32_logits():
  model, params = tiny_llama(dtype="bfloat16")
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  x = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 61)
  apply = jax.jit(lambda m, p: m.apply({"params": p}, x), static_argnums=0)
  logits = apply(model, params)
  assert logits.dtype == jnp.float32
  exact = apply(model.clone(dtype="float32"), params)
  assert float(jnp.abs(logits - exact).max()) < 0.1 * float(jnp.abs(exact).max())
  _, bf16_params = tiny_llama(param_dtype="bfloat16")
  assert {leaf.dtype for leaf in jax.tree.leaves(bf16_params)} == {jnp.dtype(jnp.bfloat16)}


def test_llama_is_registered_and_exported():
  import fjt
  assert fjt.Llama is Llama and fjt.MODELS["llama"] is Llama and GPT is fjt.GPT
  with pytest.raises(ValueError, match="num_kv_heads 3"):
    tiny_llama(num_kv_heads=3)


def test_logical_axes_split_llama_as_megatron_and_zero3():
  from jax.sharding import PartitionSpec as P

  from fjt import config, sharding
  model = create_model(TINY)
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))
  mesh = sharding.abstract_mesh({"fsdp": 2, "model": 2}, 4)
  specs = sharding.logical_shardings(boxed["params"], mesh, config.RUN_DEFAULTS["sharding_rules"])
  layer = specs["model"]["layers_0"]
  assert layer["self_attn"]["q_proj"]["kernel"].spec == P("fsdp", "model")  # Column split.
  assert layer["self_attn"]["k_proj"]["kernel"].spec == P("fsdp", "model")
  assert layer["self_attn"]["o_proj"]["kernel"].spec == P("model", "fsdp")  # Row split.
  assert layer["mlp"]["down_proj"]["kernel"].spec == P("model", "fsdp")
  assert specs["lm_head"]["kernel"].spec == P("fsdp")  # 61 rows: the vocab does not split.
  assert layer["input_layernorm"]["scale"].spec == P("fsdp")


def test_from_pretrained_and_save_pretrained_cover_llama(hf_model, tmp_path):
  torch, transformers, module = hf_model
  from fjt.interop import hf
  module.save_pretrained(tmp_path / "hf", safe_serialization=True)
  model, variables, report = hf.from_pretrained(tmp_path / "hf")
  assert isinstance(model, Llama) and report.model_type == "llama"
  ids = np.random.default_rng(1).integers(0, 61, (2, 16))
  with torch.no_grad():
    expected = module(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(model.apply(variables, jnp.asarray(ids, jnp.int32)), expected,
                             rtol=0, atol=1e-4)
  hf.save_pretrained(model, variables, tmp_path / "back")
  again, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back",
                                                               output_loading_info=True)
  assert all(not v for v in info.values()), info
  with torch.no_grad():
    np.testing.assert_array_equal(again.eval()(torch.tensor(ids)).logits.numpy(), expected)
