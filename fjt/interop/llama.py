"""Hugging Face ``LlamaForCausalLM`` <-> ``fjt.models.Llama``: configs and state_dicts.

Four functions, the architecture's entry in ``fjt.interop.hf``: ``module_from_config`` and
``config_from_module`` (a ``config.json`` dict, ``model_type`` "llama"), and
``variables_from_state_dict`` / ``state_dict_from_variables`` (HF's keys, with the ``model.``
prefix and ``lm_head.weight``; a torch ``Linear`` weight ``(out, in)`` is a Linen kernel
``(in, out)``). Every key is accounted for: a missing, unexpected or misshapen tensor is an
error naming it. Features of HF's Llama that ``Llama`` does not compute (biases, rope scaling,
another activation) are errors naming the config key, never ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fjt.models.llama import Llama

PyTree = Any

MODEL_TYPE = "llama"
BASE_PREFIX = "model."
# Non-persistent buffers some checkpoints carry (older transformers saved the rotary inverse
# frequencies); recomputed from rope_theta, so never read. ``re.fullmatch`` on a key.
BUFFERS = (r"(.*\.)?rotary_emb\.inv_freq",)

# HF key inside one decoder layer -> (Linen path inside ``model/layers_{i}``, transposed).
_LAYER_KEYS = (
    ("self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), True),
    ("self_attn.k_proj.weight", ("self_attn", "k_proj", "kernel"), True),
    ("self_attn.v_proj.weight", ("self_attn", "v_proj", "kernel"), True),
    ("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), True),
    ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), True),
    ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), True),
    ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), True),
    ("input_layernorm.weight", ("input_layernorm", "scale"), False),
    ("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), False),
)


def _names(module: Llama) -> Iterator[tuple[str, tuple[str, ...], bool]]:
  """``(HF key, Linen params path, transposed)`` for every tensor of ``module``, HF's order."""
  yield "model.embed_tokens.weight", ("model", "embed_tokens", "embedding"), False
  for i in range(module.num_layers):
    for key, path, transposed in _LAYER_KEYS:
      yield f"model.layers.{i}.{key}", ("model", f"layers_{i}") + path, transposed
  yield "model.norm.weight", ("model", "norm", "scale"), False
  if not module.tie_embeddings:
    yield "lm_head.weight", ("lm_head", "kernel"), True


def _get(tree: Mapping, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _require(config: Mapping, key: str, expected, default=None):
  value = config.get(key, default)
  if value != expected:
    raise ValueError(f"Llama config.json key {key!r}: fjt's Llama computes {expected!r}, the "
                     f"config has {value!r}")


def module_from_config(hf_config: Mapping[str, Any]) -> Llama:
  """The ``Llama`` of a ``LlamaConfig`` dict (``config.json``): vocabulary, width, depth,
  heads, key/value heads, SwiGLU width, ``max_position_embeddings`` (as ``block_size``),
  ``rope_theta`` (top level, or ``rope_parameters`` of transformers 5), ``rms_norm_eps``,
  ``tie_word_embeddings``; float32, no dropout. A key fjt's Llama does not compute as the
  config asks (biases, rope scaling, an activation other than SiLU, a head width other than
  ``hidden_size / num_attention_heads``) is a ``ValueError`` naming it."""
  try:
    heads, width = int(hf_config["num_attention_heads"]), int(hf_config["hidden_size"])
    sizes = {k: int(hf_config[k]) for k in ("vocab_size", "num_hidden_layers",
                                            "intermediate_size")}
  except KeyError as e:
    raise ValueError(f"Llama config.json: missing key {e.args[0]!r}") from None
  _require(hf_config, "model_type", MODEL_TYPE, MODEL_TYPE)
  _require(hf_config, "hidden_act", "silu", "silu")
  _require(hf_config, "attention_bias", False, False)
  _require(hf_config, "mlp_bias", False, False)
  _require(hf_config, "head_dim", width // heads, width // heads)
  _require(hf_config, "rope_scaling", None)
  rope = dict(hf_config.get("rope_parameters") or {})
  _require(rope, "rope_type", "default", "default")
  theta = rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))
  return Llama(vocab_size=sizes["vocab_size"],
               block_size=int(hf_config.get("max_position_embeddings", 2048)),
               num_layers=sizes["num_hidden_layers"], num_heads=heads,
               num_kv_heads=int(hf_config.get("num_key_value_heads") or heads),
               embed_dim=width, mlp_dim=sizes["intermediate_size"], rope_theta=float(theta),
               rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
               tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
               dropout_rate=0.0)


def config_from_module(module: Llama) -> dict[str, Any]:
  """The ``config.json`` dict of ``LlamaForCausalLM`` that computes what ``module`` does."""
  theta = float(module.rope_theta)
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": MODEL_TYPE,
      "vocab_size": module.vocab_size, "hidden_size": module.embed_dim,
      "intermediate_size": module.mlp_dim, "num_hidden_layers": module.num_layers,
      "num_attention_heads": module.num_heads, "num_key_value_heads": module.kv_heads,
      "head_dim": module.embed_dim // module.num_heads, "hidden_act": "silu",
      "max_position_embeddings": module.block_size, "rms_norm_eps": module.rms_norm_eps,
      "rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta},
      "rope_scaling": None, "tie_word_embeddings": module.tie_embeddings,
      "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
      "initializer_range": 0.02, "dtype": jnp.dtype(module.param_dtype).name,
  }


def _param_shapes(module: Llama) -> PyTree:
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
  return nn.meta.unbox(shapes)["params"]


def variables_from_state_dict(state_dict: Mapping[str, Any], module: Llama) -> dict[str, PyTree]:
  """``{"params": ...}`` of ``module`` from a ``LlamaForCausalLM`` state_dict (numpy arrays or
  anything ``np.asarray`` reads), in ``module.param_dtype``. Keys carry the base model's
  ``model.`` prefix (``model.layers.0.mlp.up_proj.weight``, as ``LlamaForCausalLM`` saves) or,
  all of them, not (``layers.0.mlp.up_proj.weight``, as ``LlamaModel`` saves);
  ``lm_head.weight`` never does.

  Strict: every key of ``module`` must be there with its shape, and no other key (but the
  ``BUFFERS``). A tied module takes no ``lm_head.weight``, unless it equals the embedding (as
  ``LlamaForCausalLM.state_dict()`` of a tied model lists it)."""
  if not any(k.startswith(BASE_PREFIX) for k in state_dict):
    state_dict = {(k if k == "lm_head.weight" else BASE_PREFIX + k): v for k, v in state_dict.items()}
  shapes = _param_shapes(module)
  dtype = jnp.dtype(module.param_dtype)
  params: dict[str, Any] = {}
  left = {k for k in state_dict if not any(re.fullmatch(b, k) for b in BUFFERS)}
  missing = []
  for key, path, transposed in _names(module):
    if key not in state_dict:
      missing.append(key)
      continue
    left.discard(key)
    value = np.asarray(state_dict[key])
    value = value.T if transposed else value
    expected = _get(shapes, path).shape
    if value.shape != expected:
      raise ValueError(f"Llama state_dict key {key!r}: shape {np.shape(state_dict[key])}, the "
                       f"model expects {expected[::-1] if transposed else expected}")
    _set(params, path, value.astype(dtype))
  if module.tie_embeddings and "lm_head.weight" in left:
    if np.array_equal(np.asarray(state_dict["lm_head.weight"]),
                      np.asarray(state_dict.get("model.embed_tokens.weight"))):
      left.discard("lm_head.weight")
  if missing or left:
    raise ValueError(f"Llama state_dict: missing keys {missing}, unexpected keys {sorted(left)}"
                     f" (tie_embeddings={module.tie_embeddings})")
  return {"params": params}


def state_dict_from_variables(variables: Mapping[str, PyTree], module: Llama) -> dict[str, np.ndarray]:
  """The ``LlamaForCausalLM`` state_dict of ``variables`` (``{"params": ...}`` or the params),
  HF's keys in HF's order, ``(out, in)`` Linear weights, dtypes kept; no ``lm_head.weight``
  when the head is tied (as ``save_pretrained`` writes it)."""
  params = variables.get("params", variables)
  out = {}
  for key, path, transposed in _names(module):
    try:
      value = np.asarray(_get(params, path))
    except KeyError:
      raise ValueError(f"Llama variables: no params/{'/'.join(path)} for {key!r}") from None
    out[key] = np.ascontiguousarray(value.T if transposed else value)
  return out
