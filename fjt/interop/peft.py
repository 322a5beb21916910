"""LoRA adapters (``fjt.lora``) as a PEFT adapter folder (GPT for GPT-2, Llama for Llama): ``adapter_config.json`` +
``adapter_model.safetensors``, which ``peft.PeftModel.from_pretrained(hf_model, folder)`` loads.

PEFT keeps ``lora_A.weight`` of shape ``(r, in)`` and ``lora_B.weight`` of shape ``(out, r)``
and adds ``lora_alpha / r * B @ A`` (``(out, in)``; transposed for a module whose weight is
stored ``(in, out)``, ``fan_in_fan_out``) to the module's weight; fjt's ``{"a": (in, r),
"b": (r, out)}`` of a kernel ``(in, out)`` is ``A = a.T``, ``B = b.T``. Which Hugging Face
module a kernel belongs to is a model's ``PeftModules``: ``(kernel path regex, module name
template)`` rules and whether its weights are stored ``(in, out)`` (Hugging Face's ``Conv1D``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence

import numpy as np

from fjt.models import GPT, Llama
from fjt.tree import flatten


@dataclasses.dataclass(frozen=True)
class PeftModules:
  """Where fjt kernels sit in a Hugging Face model: ``rules`` of ``(pattern, template)``, the
  pattern ``re.fullmatch``-ed on a kernel's params path, ``match.expand(template)`` the module's
  name; ``fan_in_fan_out``: the modules store their weights ``(in, out)``."""
  rules: tuple[tuple[str, str], ...]
  fan_in_fan_out: bool
  task_type: str | None = None


# fjt.models.GPT <-> GPT2LMHeadModel, whose c_attn, c_proj and c_fc are Conv1D: (in, out).
GPT2_MODULES = PeftModules(
    rules=((r"h_(\d+)/(attn|mlp)/(c_attn|c_proj|c_fc)/kernel", r"transformer.h.\1.\2.\3"),),
    fan_in_fan_out=True, task_type="CAUSAL_LM")
# fjt.models.Llama <-> LlamaForCausalLM, whose projections are nn.Linear: (out, in).
LLAMA_MODULES = PeftModules(
    rules=((r"model/layers_(\d+)/(self_attn|mlp)/(\w+_proj)/kernel", r"model.layers.\1.\2.\3"),),
    fan_in_fan_out=False, task_type="CAUSAL_LM")
PEFT_MODULES: dict[type, PeftModules] = {GPT: GPT2_MODULES, Llama: LLAMA_MODULES}


def module_names(adapters, modules: PeftModules) -> dict[str, str]:
  """``{kernel path: Hugging Face module name}`` of every adapted kernel; a kernel no rule
  names is a ``ValueError`` naming it."""
  kernels = sorted({p[:-2] for p in flatten(adapters)}, key=_natural)
  names = {}
  for path in kernels:
    for pattern, template in modules.rules:
      if match := re.fullmatch(pattern, path):
        names[path] = match.expand(template)
        break
    else:
      raise ValueError(f"adapter of {path}: no Hugging Face module is known for it (rules: "
                       f"{[p for p, _ in modules.rules]})")
  return names


def _natural(path: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def save_adapters(out_dir: str, adapters, alpha: float, modules: PeftModules,
                  base_model: str | None = None) -> list[str]:
  """Writes ``adapters`` (``fjt.lora.init``'s tree, trained) to ``out_dir`` as a PEFT LoRA
  adapter: float32 ``base_model.model.<module>.lora_A.weight`` ``(r, in)`` and ``lora_B.weight``
  ``(out, r)``, and a config with ``r``, ``lora_alpha = alpha``, the exact module names as
  ``target_modules`` and ``modules.fan_in_fan_out``. Returns the tensor keys written."""
  from safetensors.numpy import save_file

  names = module_names(adapters, modules)
  flat = flatten(adapters)
  ranks = {flat[f"{p}/a"].shape[1] for p in names}
  if len(ranks) != 1:
    raise ValueError(f"adapters of ranks {sorted(ranks)}: a PEFT adapter has one rank")
  tensors = {}
  for path, name in names.items():
    a, b = (np.asarray(flat[f"{path}/{k}"], np.float32) for k in ("a", "b"))
    tensors[f"base_model.model.{name}.lora_A.weight"] = np.ascontiguousarray(a.T)
    tensors[f"base_model.model.{name}.lora_B.weight"] = np.ascontiguousarray(b.T)
  config = {
      "peft_type": "LORA", "task_type": modules.task_type, "r": ranks.pop(),
      "lora_alpha": float(alpha), "target_modules": list(names.values()),
      "fan_in_fan_out": modules.fan_in_fan_out, "lora_dropout": 0.0, "bias": "none",
      "inference_mode": True, "base_model_name_or_path": base_model, "modules_to_save": None,
      "init_lora_weights": True, "use_rslora": False, "use_dora": False}
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"))
  with open(os.path.join(out_dir, "adapter_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  return list(tensors)


def peft_modules(model, key: str = "model") -> PeftModules:
  """The ``PeftModules`` of ``model``'s class (``PEFT_MODULES``); another class is a
  ``ValueError`` naming it."""
  for cls, modules in PEFT_MODULES.items():
    if isinstance(model, cls):
      return modules
  raise ValueError(f"{key}: {type(model).__name__} has no Hugging Face twin known to PEFT export "
                   f"(known: {[c.__name__ for c in PEFT_MODULES]}); add it to "
                   "fjt.interop.peft.PEFT_MODULES")


__all__: Sequence[str] = ["GPT2_MODULES", "LLAMA_MODULES", "PEFT_MODULES", "PeftModules", "module_names",
                          "peft_modules", "save_adapters"]
