"""Hugging Face model folders <-> fjt models and variables, both ways, by one registry.

  model, variables, report = from_pretrained("gpt2-folder")   # config.json + weights
  save_pretrained(model, variables, "out")                    # transformers loads it back

A folder is ``config.json`` (its ``model_type`` picks the architecture) and its weights:
``model.safetensors``, a sharded ``model.safetensors.index.json``, or ``pytorch_model.bin``
(read by ``torch.load(weights_only=True)``: never an unpickle that could run code) or its own
sharded index. Keys may carry the base model's prefix (``transformer.h.0...``, as
``GPT2LMHeadModel`` saves) or not (the hub's older ``GPT2Model`` files); known non-weight
buffers (causal-mask ``attn.bias`` / ``attn.masked_bias``, ``rotary_emb.inv_freq``) are dropped
and listed in the report. Every other tensor must find its place and every parameter a value.

An architecture is four functions, registered under the ``model_type`` of its ``config.json``
(``register_architecture``); GPT-2 (``"gpt2"`` <-> ``fjt.models.GPT``) is registered here:

  module_from_config(hf_config: dict) -> nn.Module
  config_from_module(module) -> dict                 a transformers config.json dict
  variables_from_state_dict(state_dict, module) -> variables
      ``state_dict``: key -> numpy array, keys WITHOUT the ``base_prefix`` (``h.0.ln_1.weight``,
      ``wte.weight``, ``lm_head.weight``) and without the dropped buffers
  state_dict_from_variables(variables, module) -> dict[str, np.ndarray]
      the keys of the Hugging Face head model's own ``state_dict()`` (``transformer.h.0...``)
      in its layouts; a tied head is left out, as transformers' own files leave it out
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from fjt.interop import torch as interop
from fjt.interop.architectures import ARCHITECTURES, Architecture, register_architecture  # noqa: F401 (re-exported)
from fjt.interop.files import load_file, save_file
from fjt.models.gpt import GPT

PyTree = Any
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
# Buffers that are not weights, for every architecture: transformers recomputes them.
COMMON_BUFFERS = (r"(.*\.)?rotary_emb\.inv_freq",)


@dataclasses.dataclass(frozen=True)
class PretrainedReport:
  """What ``from_pretrained`` read: the ``model_type``, the weight ``files``, the ``dropped``
  buffer keys (not weights), whether keys carried the base-model ``prefix``, and ``notes``."""
  model_type: str
  files: tuple[str, ...]
  dropped: tuple[str, ...]
  prefix: str
  notes: tuple[str, ...] = ()

  def __str__(self) -> str:
    dropped = f"dropped {len(self.dropped)} non-weight buffers ({', '.join(self.dropped[:3])}" \
              f"{', ...' if len(self.dropped) > 3 else ''})" if self.dropped else "no buffers dropped"
    return (f"{self.model_type} from {', '.join(os.path.basename(f) for f in self.files)}; "
            f"{dropped}" + "".join(f"; {n}" for n in self.notes))


def _architecture(model_type: Any, where: str) -> Architecture:
  if model_type not in ARCHITECTURES:
    raise ValueError(f"{where}: model_type {model_type!r} is not supported; supported: "
                     f"{', '.join(sorted(ARCHITECTURES))}")
  return ARCHITECTURES[model_type]


def read_config(path: str | os.PathLike) -> dict:
  """The ``config.json`` of a Hugging Face folder (or of the folder of a weight file)."""
  folder = os.fspath(path) if os.path.isdir(path) else os.path.dirname(os.fspath(path))
  file = os.path.join(folder, CONFIG)
  try:
    with open(file, encoding="utf-8") as f:
      config = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{file!r}: cannot read the Hugging Face config ({e}); a model folder "
                     f"holds config.json beside its weights") from e
  if not isinstance(config, dict):
    raise ValueError(f"{file!r}: expected a JSON object, got {type(config).__name__}")
  return config


def is_pretrained(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a Hugging Face model folder: ``config.json`` with a ``model_type``
  beside weights (an fjt or Orbax checkpoint has neither)."""
  path = os.fspath(path)
  if not os.path.isfile(os.path.join(path, CONFIG)):
    return False
  try:
    return "model_type" in read_config(path) and bool(weight_files(path))
  except ValueError:
    return False


def weight_files(path: str | os.PathLike) -> list[str]:
  """The weight files of a folder, in the order their index lists them (or ``[path]`` for a
  file): ``model.safetensors``, ``model.safetensors.index.json``'s shards,
  ``pytorch_model.bin`` or ``pytorch_model.bin.index.json``'s shards."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    if not os.path.isfile(path):
      raise ValueError(f"{path!r}: no such Hugging Face folder or weight file")
    return [path]
  for single, index in ((WEIGHTS, WEIGHTS + ".index.json"),
                        ("pytorch_model.bin", "pytorch_model.bin.index.json")):
    if os.path.isfile(os.path.join(path, single)):
      return [os.path.join(path, single)]
    if os.path.isfile(os.path.join(path, index)):
      try:
        with open(os.path.join(path, index), encoding="utf-8") as f:
          weight_map = json.load(f)["weight_map"]
      except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{os.path.join(path, index)!r}: expected a JSON object with a "
                         f"'weight_map' of key -> shard file ({e})") from e
      return [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
  raise ValueError(f"{path!r}: no weights: expected {WEIGHTS}, {WEIGHTS}.index.json, "
                   f"pytorch_model.bin or pytorch_model.bin.index.json")


def from_pretrained(path: str | os.PathLike) -> tuple[nn.Module, PyTree, PretrainedReport]:
  """The fjt model of a Hugging Face folder (or weight file beside its ``config.json``), its
  variables and a report: ``model, variables, report = from_pretrained(path)``.

  The model is built from ``config.json`` by the architecture registered for its
  ``model_type``; the variables (``{"params", ...}``, float32 jax arrays in the model's
  ``param_dtype``) are loaded strictly: every tensor but the dropped buffers finds its place,
  every parameter gets a value, or an error names them.

  Raises:
    ValueError: no config or weights, an unknown ``model_type`` (one line naming the
      supported ones), a config the fjt model cannot express, or tensors that do not fit.
  """
  config = read_config(path)
  arch = _architecture(config.get("model_type"), os.path.join(
      os.fspath(path) if os.path.isdir(path) else os.path.dirname(os.fspath(path)), CONFIG))
  module = arch.module_from_config(config)  # A config fjt cannot express fails before any read.
  files = weight_files(path)
  state_dict: dict[str, np.ndarray] = {}
  for file in files:
    state_dict.update(load_file(file))
  prefixed = bool(arch.base_prefix) and any(k.startswith(arch.base_prefix) for k in state_dict)
  buffers = [re.compile(p) for p in arch.buffers + COMMON_BUFFERS]
  weights, dropped = {}, []
  for key, value in state_dict.items():
    short = key[len(arch.base_prefix):] if prefixed and key.startswith(arch.base_prefix) else key
    if any(b.fullmatch(short) for b in buffers):
      dropped.append(key)
    else:
      weights[short] = value
  variables = arch.variables_from_state_dict(weights, module)
  notes = tuple(getattr(module, "import_notes", ()))
  return module, variables, PretrainedReport(arch.model_type, tuple(files), tuple(dropped),
                                             arch.base_prefix if prefixed else "", notes)


def module_from_config(config: Mapping, where: str = "config.json") -> nn.Module:
  """The fjt model of a Hugging Face ``config.json`` dict, by its ``model_type``."""
  return _architecture(config.get("model_type"), where).module_from_config(dict(config))


def _architecture_of(module: nn.Module) -> Architecture:
  for arch in ARCHITECTURES.values():
    if arch.module_class is not None and isinstance(module, arch.module_class):
      return arch
  for arch in ARCHITECTURES.values():
    if arch.module_class is None:
      try:
        arch.config_from_module(module)
        return arch
      except (TypeError, ValueError, AttributeError):
        continue
  raise ValueError(f"save_pretrained: no Hugging Face architecture is registered for "
                   f"{type(module).__name__}; supported model types: "
                   f"{', '.join(sorted(ARCHITECTURES))} (fjt.interop.hf.register_architecture)")


def save_pretrained(model: nn.Module, variables: PyTree, out_dir: str | os.PathLike) -> list[str]:
  """Writes ``config.json`` and ``model.safetensors`` to ``out_dir``, which transformers'
  ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads with no missing, unexpected or
  mismatched keys. Returns the tensor keys written."""
  arch = _architecture_of(model)
  config = arch.config_from_module(model)
  state_dict = arch.state_dict_from_variables(jax.device_get(variables), model)
  os.makedirs(out_dir, exist_ok=True)
  save_file(state_dict, os.path.join(out_dir, WEIGHTS))
  with open(os.path.join(out_dir, CONFIG), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  return list(state_dict)


# --- GPT-2 <-> fjt.models.GPT -------------------------------------------------------------------

_GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # Both GELU's tanh approximation.


def gpt2_module(config: Mapping) -> GPT:
  """``fjt.models.GPT`` of a GPT-2 ``config.json``; a setting GPT cannot express is an error
  naming the key."""
  expect = {"activation_function": _GPT2_ACTIVATIONS, "layer_norm_epsilon": (1e-5,),
            "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,),
            "add_cross_attention": (False,), "tie_word_embeddings": (True,)}
  for key, allowed in expect.items():
    if key in config and config[key] not in allowed:
      raise ValueError(f"GPT-2 config key {key!r} = {config[key]!r}: fjt.models.GPT supports "
                       f"only {' or '.join(map(repr, allowed))}")
  width = int(config["n_embd"])
  if config.get("n_inner") not in (None, 4 * width):
    raise ValueError(f"GPT-2 config key 'n_inner' = {config['n_inner']!r}: fjt.models.GPT "
                     f"supports only 4 * n_embd ({4 * width}) or null")
  return GPT(vocab_size=int(config["vocab_size"]), block_size=int(config["n_positions"]),
             num_layers=int(config["n_layer"]), num_heads=int(config["n_head"]), embed_dim=width,
             dropout_rate=float(config.get("resid_pdrop", 0.1)))


def gpt2_config(model: GPT) -> dict:
  """The ``config.json`` of ``GPT2LMHeadModel`` equal to ``model``."""
  if not isinstance(model, GPT):
    raise TypeError(f"expected an fjt GPT, got {type(model).__name__}")
  return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
          "vocab_size": model.vocab_size, "n_positions": model.block_size,
          "n_embd": model.embed_dim, "n_layer": model.num_layers, "n_head": model.num_heads,
          "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
          "resid_pdrop": model.dropout_rate, "embd_pdrop": model.dropout_rate,
          "attn_pdrop": 0.0,  # fjt's GPT drops no attention probabilities.
          "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True,
          # GPT-2's <|endoftext|> is its last id (50256); transformers' default is out of range
          # for a smaller vocabulary.
          "bos_token_id": model.vocab_size - 1, "eos_token_id": model.vocab_size - 1,
          "dtype": np.dtype(model.param_dtype).name}


def gpt2_variables(state_dict: dict[str, np.ndarray], model: GPT) -> PyTree:
  """``{"params"}`` of ``model`` from GPT-2 keys without ``transformer.`` (strict); a
  ``lm_head.weight`` must equal ``wte.weight`` (fjt's GPT ties its head)."""
  weights = dict(state_dict)
  head = weights.pop("lm_head.weight", None)
  if head is not None and not np.array_equal(head, weights.get("wte.weight")):
    raise ValueError("GPT-2 weights: lm_head.weight differs from wte.weight, and fjt.models.GPT "
                     "ties its output head to the token embedding")
  target = interop.abstract_variables(model, np.zeros((1, 1), np.int32))
  variables, _ = interop.from_state_dict(weights, target, key_map=interop.GPT2_KEY_MAP)
  return variables


def gpt2_state_dict(variables: PyTree, model: GPT) -> dict[str, np.ndarray]:
  """GPT2LMHeadModel's keys and layouts (Conv1D weights (in, out)), tied head left out."""
  return interop.to_state_dict({"params": variables["params"]},
                               key_map=interop.GPT2_EXPORT_KEY_MAP)


register_architecture(
    "gpt2", module_from_config=gpt2_module, config_from_module=gpt2_config,
    variables_from_state_dict=gpt2_variables, state_dict_from_variables=gpt2_state_dict,
    buffers=(r"h\.\d+\.attn\.(bias|masked_bias)",), base_prefix="transformer.", module_class=GPT)


def _register_llama() -> None:
  from fjt.interop import llama
  register_architecture(
      llama.MODEL_TYPE, module_from_config=llama.module_from_config,
      config_from_module=llama.config_from_module,
      variables_from_state_dict=llama.variables_from_state_dict,
      state_dict_from_variables=llama.state_dict_from_variables,
      buffers=llama.BUFFERS, base_prefix=llama.BASE_PREFIX, module_class=llama.Llama)


_register_llama()
