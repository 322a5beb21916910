"""mergekit-style merge configs (YAML), so a mergekit user's config runs on fjt checkpoints.

::

  merge_method: ties                 # ties | dare_ties | dare_linear | slerp | linear, or a rule
  base_model: runs/text_gpt          # of fjt.aggregate.RULES (dare, mean, median ...)
  models:
    - model: runs/ft_web
      parameters: {weight: 1.0, density: 0.2}
    - model: runs/ft_async
      parameters: {weight: 1.0, density: 0.2}
  parameters: {t: 0.5, density: 0.2, lambda: 1.0, seed: 0}

Per-model ``weight`` and ``density`` (a density per model, or one for all); global
``parameters`` are the rule's (``lambda`` is TIES's ``scale``; ``normalize: true``, mergekit's
default, is the only normalisation; ``seed``, DARE's, is fjt's own). Paths are checkpoints or
run workdirs, relative to the working directory. A key fjt does not support (``dtype``,
``slices``, ``tokenizer_source`` ...) is an error naming it. YAML is read with PyYAML, which
fjt's dependencies flax and orbax-checkpoint install.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fjt.config import ConfigError

METHODS = {"linear": "mean", "dare_linear": "dare"}  # mergekit's names that differ from fjt's.
TOP_KEYS = ("merge_method", "base_model", "models", "parameters")
MODEL_KEYS = ("model", "parameters")
MODEL_PARAMETERS = ("weight", "density")
RENAMED = {"lambda": "scale"}


@dataclasses.dataclass
class MergeSpec:
  """A merge to run with ``fjt.merge.average_checkpoints(paths, out, weights, method,
  params=params, base=base)``."""
  method: str
  paths: list[str]
  base: str | None
  weights: list[float] | None
  params: dict[str, Any]


def _mapping(value: Any, where: str, path: str) -> dict:
  if value is None:
    return {}
  if not isinstance(value, dict):
    raise ConfigError(f"{path}: {where} must be a mapping, got {type(value).__name__}")
  return value


def _only(keys, allowed, where: str, path: str) -> None:
  for key in keys:
    if key not in allowed:
      raise ConfigError(f"{path}: key '{where}{key}' is not supported by fjt (supported: "
                        f"{', '.join(allowed)})")


def parse_merge_config(data: Any, path: str = "merge config") -> MergeSpec:
  """A ``MergeSpec`` from a parsed mergekit-style config (the module docstring); ``path``
  names the file in errors."""
  data = _mapping(data, "the file", path)
  _only(data, TOP_KEYS, "", path)
  if "merge_method" not in data:
    raise ConfigError(f"{path}: key 'merge_method' is missing")
  method = METHODS.get(data["merge_method"], data["merge_method"])
  models = data.get("models") or []
  if not isinstance(models, list) or not models:
    raise ConfigError(f"{path}: key 'models' must be a non-empty list of {{model: PATH}}")
  paths, weights, densities = [], [], []
  for i, entry in enumerate(models):
    entry = {"model": entry} if isinstance(entry, str) else _mapping(entry, f"models[{i}]", path)
    _only(entry, MODEL_KEYS, f"models[{i}].", path)
    if not isinstance(entry.get("model"), str):
      raise ConfigError(f"{path}: models[{i}].model must be a checkpoint path")
    parameters = _mapping(entry.get("parameters"), f"models[{i}].parameters", path)
    _only(parameters, MODEL_PARAMETERS, f"models[{i}].parameters.", path)
    paths.append(entry["model"])
    weights.append(parameters.get("weight"))
    densities.append(parameters.get("density"))
  params = {}
  for key, value in _mapping(data.get("parameters"), "parameters", path).items():
    if key == "normalize":
      if value is not True:
        raise ConfigError(f"{path}: parameters.normalize: only true (mergekit's default) is "
                          "supported")
      continue
    if isinstance(value, (list, dict)):
      raise ConfigError(f"{path}: parameters.{key}: fjt takes one number, not a gradient or "
                        "filter list")
    params[RENAMED.get(key, key)] = value
  if any(d is not None for d in densities):
    if any(d is None for d in densities) and "density" not in params:
      raise ConfigError(f"{path}: some models have a density and others none; give "
                        "parameters.density as the default")
    given = [params.get("density") if d is None else d for d in densities]
    params["density"] = given[0] if len(set(given)) == 1 else tuple(given)
  if any(w is not None for w in weights):
    weights = [1.0 if w is None else float(w) for w in weights]
  else:
    weights = None
  base = data.get("base_model")
  if base is not None and not isinstance(base, str):
    raise ConfigError(f"{path}: base_model must be a checkpoint path")
  return MergeSpec(method, paths, base, weights, params)


def load_merge_config(path: str) -> MergeSpec:
  """Reads a mergekit-style YAML file (``parse_merge_config``)."""
  import yaml  # Installed by flax and orbax-checkpoint; imported only for YAML configs.
  try:
    with open(path, encoding="utf-8") as f:
      data = yaml.safe_load(f)
  except OSError as e:
    raise ConfigError(f"merge config {path!r} cannot be read: {e.strerror}") from e
  except yaml.YAMLError as e:
    raise ConfigError(f"merge config {path!r} is not valid YAML: {str(e).splitlines()[0]}") from e
  return parse_merge_config(data, path)
