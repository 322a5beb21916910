"""Weight files and Hugging Face folders <-> fjt checkpoints (``scripts/convert.py``)."""

from __future__ import annotations

import json
import os

import jax

from fjt import checkpoint, runs
from fjt import lora as fjt_lora
from fjt.config import load_config
from fjt.interop import hf
from fjt.interop import torch as interop
from fjt.models import CNN, create_model


def _example(config):
  from fjt.data import load_dataset
  return load_dataset(config.data).train["x"][:1]


def _nchw_flatten(model, example):
  """PyTorch flattens conv features as NCHW: the CNN's first Dense gets its rows permuted."""
  return interop.cnn_nchw_flatten(model, example.shape) if isinstance(model, CNN) else None


def import_weights(weights_path: str, out_dir: str, config_path: str) -> interop.ImportReport:
  """A ``.safetensors`` / ``.pt`` state_dict -> an fjt checkpoint (``{"params",
  "batch_stats"}``) for the model of ``config_path``, written to ``out_dir``. Strict: every
  variable of the model must get a value and every tensor (but ``num_batches_tracked``) a
  place, or ``interop.StateDictMismatch`` names them all."""
  try:
    state_dict = interop.load_file(weights_path)
  except OSError as e:  # A truncated file: torch says "[Errno 22] Invalid argument", no name.
    if e.filename is not None:
      raise
    raise ValueError(f"{weights_path}: cannot read the weights ({e.strerror or e}); the file is "
                     "damaged or not a PyTorch/safetensors file") from e
  config = load_config(config_path)
  model, example = create_model(config.model), _example(config)
  variables, report = interop.from_state_dict(state_dict, interop.abstract_variables(model, example),
                                              nchw_flatten=_nchw_flatten(model, example))
  checkpoint.save(out_dir, variables)
  return report


def export_weights(checkpoint_path: str, out_path: str, config_path: str | None = None) -> list[str]:
  """An fjt checkpoint's variables -> ``.safetensors`` / ``.pt`` with PyTorch keys and
  layouts. ``config_path`` (needed for the CNN) sets the NCHW flatten permutation.
  Returns the keys written."""
  variables = runs.load_variables(checkpoint_path)  # A LoRA run's: merged.
  nchw = None
  if config_path:
    config = load_config(config_path)
    nchw = _nchw_flatten(create_model(config.model), _example(config))
  state_dict = interop.to_state_dict(jax.device_get(variables), nchw_flatten=nchw)
  interop.save_file(state_dict, out_path)
  return list(state_dict)


def is_weights_file(path: str) -> bool:
  return os.fspath(path).endswith(interop.FILE_TYPES)


HF_CONFIG = "hf_config.json"  # Beside an imported folder's checkpoint: the model it belongs to.


def import_pretrained(hf_path: str, out_dir: str) -> hf.PretrainedReport:
  """A Hugging Face folder (``hf.from_pretrained``) -> an fjt checkpoint ``{"params", ...}`` in
  ``out_dir``, with the model's ``config.json`` as ``out_dir/hf_config.json`` (for the way back)."""
  model, variables, report = hf.from_pretrained(hf_path)
  checkpoint.save(out_dir, variables)
  with open(os.path.join(out_dir, HF_CONFIG), "w", encoding="utf-8") as f:
    json.dump(hf.ARCHITECTURES[report.model_type].config_from_module(model), f, indent=2)
  return report


def export_pretrained(checkpoint_path: str, out_dir: str, config_path: str | None = None) -> list[str]:
  """An fjt checkpoint -> a Hugging Face folder (``hf.save_pretrained``). The model: that of
  ``config_path`` (a config file or run workdir), else the checkpoint's ``hf_config.json``
  (written by ``import_pretrained``), else that of the run that wrote the checkpoint."""
  variables = runs.load_variables(checkpoint_path)  # A LoRA run's: merged.
  saved = os.path.join(checkpoint.resolve(checkpoint_path)[0], HF_CONFIG)
  if config_path is None and os.path.isfile(saved):
    with open(saved, encoding="utf-8") as f:
      model = hf.module_from_config(json.load(f), saved)
  else:
    model = create_model(runs.run_config(config_path or checkpoint_path).model)
  return hf.save_pretrained(model, variables, out_dir)


LORA_EXPORTS = ("merged", "adapters", "peft")


def export_lora(run: str, out: str, what: str = "merged") -> list[str]:
  """Writes a LoRA run's model (``run``: its workdir, ``checkpoints/`` or a step) to ``out``:
  ``merged``, an fjt checkpoint of ``{"params": base + alpha/r a @ b, "batch_stats"}`` (what a
  full fine-tune would have saved); ``adapters``, an fjt checkpoint of the adapter tree alone;
  ``peft``, a PEFT adapter folder for the model's Hugging Face twin (``fjt.interop.peft``: GPT's
  is GPT-2). Returns the tensor paths or keys written."""
  from fjt.interop import peft
  from fjt.tree import flatten

  if what not in LORA_EXPORTS:
    raise ValueError(f"LoRA export: expected one of {LORA_EXPORTS}, got {what!r}")
  if what == "peft":
    config = runs.run_config(run)
    modules = peft.peft_modules(create_model(config.model), "config key 'model'")
    return peft.save_adapters(out, fjt_lora.load(run)[1], config.lora.alpha, modules)
  tree = runs.load_variables(run) if what == "merged" else fjt_lora.load(run)[1]
  checkpoint.save(out, tree)
  return list(flatten(tree))
