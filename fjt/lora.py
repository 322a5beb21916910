"""LoRA adapters on parameter trees, for any Linen model (no change to the model's code).

A 2-D kernel ``W`` of shape ``(in, out)`` (``nn.Dense``: ``y = x @ W``) is adapted by a rank-``r``
product: the model runs with ``W + (alpha / r) * (a @ b)``, ``a`` of shape ``(in, r)``, ``b`` of
shape ``(r, out)``, and only ``a`` and ``b`` train (Hu et al. 2021, "LoRA")::

  adapters = fjt.lora.init(params, rank=8, targets=(r"attn/c_attn/kernel",), key=key)
  logits = model.apply({"params": fjt.lora.merge(params, adapters, alpha=16.0)}, x)

The adapter tree mirrors ``params`` but holds only the targeted kernels, each as
``{"a": (in, r), "b": (r, out)}``; the other leaves are absent (no ``None`` leaves: nested dicts
of arrays, which Orbax saves and restores like any params tree). ``a`` is drawn as PEFT draws
``lora_A`` (``kaiming_uniform(a=sqrt(5))`` on the ``(r, in)`` weight: uniform on
``[-1/sqrt(in), 1/sqrt(in)]``), ``b`` is zeros, so the first forward pass is the base model's
bit for bit (``W + s * (a @ 0)`` is ``W + 0 = W``).

In a run (config keys ``lora.rank``, ``lora.alpha``, ``lora.targets``) the train state's
``params`` are the adapters and its ``base`` the frozen params (``fjt.state.TrainState``): the
optimizer and its state see the adapters only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fjt.config import ConfigError
from fjt.tree import flatten, path_str, unflatten

PyTree = Any


def _rank(adapter: dict) -> int:
  return adapter["a"].shape[-1]


def targeted(params: PyTree, targets: Sequence[str]) -> dict[str, Any]:
  """``{path: kernel}`` of the leaves of ``params`` whose '/'-joined path (``h_0/attn/c_attn/kernel``)
  matches a pattern of ``targets`` (``re.search``). A pattern matching no leaf, or a matched
  leaf that is not 2-D, is a ``ConfigError`` naming it (key ``lora.targets``)."""
  if isinstance(targets, str):
    targets = (targets,)
  leaves = flatten(params)
  for pattern in targets:
    if not any(re.search(pattern, p) for p in leaves):
      raise ConfigError(f"config key 'lora.targets': pattern {pattern!r} matches no parameter; "
                        f"parameters: {list(leaves)}")
  chosen = {p: v for p, v in leaves.items() if any(re.search(t, p) for t in targets)}
  for path, leaf in chosen.items():
    if len(leaf.shape) != 2:
      raise ConfigError(f"config key 'lora.targets': {path} has shape {tuple(leaf.shape)}, "
                        "not a 2-D kernel (in, out); narrow the pattern (e.g. '.../kernel$')")
  return chosen


def init(params: PyTree, rank: int, targets: Sequence[str], key: jax.Array) -> dict[str, Any]:
  """Adapters for the kernels of ``params`` that ``targets`` name (``targeted``): nested dicts
  mirroring ``params`` with each targeted ``(in, out)`` kernel replaced by ``{"a": (in, rank),
  "b": (rank, out)}`` in the kernel's dtype; ``a ~ U(-1/sqrt(in), 1/sqrt(in))``, ``b = 0``.
  Works on arrays or ``jax.ShapeDtypeStruct`` leaves alike (under ``jax.eval_shape``)."""
  if not (isinstance(rank, int) and rank > 0):
    raise ConfigError(f"config key 'lora.rank': expected a positive int, got {rank!r}")
  flat = {}
  for i, (path, kernel) in enumerate(targeted(params, targets).items()):
    fan_in, fan_out = kernel.shape
    bound = 1.0 / fan_in ** 0.5
    a = jax.random.uniform(jax.random.fold_in(key, i), (fan_in, rank), jnp.float32, -bound, bound)
    flat[f"{path}/a"] = a.astype(kernel.dtype)
    flat[f"{path}/b"] = jnp.zeros((rank, fan_out), kernel.dtype)
  return unflatten(flat)


def merge(params: PyTree, adapters: PyTree, alpha: float) -> PyTree:
  """``params`` with ``W + (alpha / r) * (a @ b)`` on every kernel ``adapters`` holds (computed in
  the kernel's dtype), every other leaf the same object. ``adapters`` empty: ``params``."""
  flat = flatten(adapters)
  if not flat:
    return params
  kernels = {path[:-2] for path in flat if path.endswith(("/a", "/b"))}
  missing = sorted(p for p in kernels if p not in flatten(params))
  if missing or len(flat) != 2 * len(kernels):
    raise ValueError(f"lora.merge: adapters do not fit params at {missing or sorted(flat)[:3]}; "
                     "expected {'a', 'b'} pairs at kernel paths of params")

  def one(keypath, leaf):
    name = path_str(keypath)
    if name not in kernels:
      return leaf
    adapter = _at(adapters, name)
    delta = (alpha / _rank(adapter)) * (adapter["a"] @ adapter["b"])
    return (leaf + delta.astype(leaf.dtype)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(one, params)


def _at(tree: PyTree, path: str) -> PyTree:
  for part in path.split("/"):
    tree = tree[part]
  return tree


def load(path: str) -> tuple[PyTree, PyTree, PyTree]:
  """``(base, adapters, batch_stats)`` of a LoRA run's checkpoint (a run workdir, its
  ``checkpoints/`` or a step): its ``base``, ``params`` and ``batch_stats`` sub-trees. A checkpoint
  without ``base`` is a ``CheckpointError`` saying so. ``fjt.runs.load_variables`` merges them;
  ``fjt.interop.convert.export_lora`` writes them out."""
  from fjt import checkpoint

  tree = checkpoint.load(path)
  if not tree.get("base"):
    raise checkpoint.CheckpointError(f"checkpoint {path}: no 'base' params, so not a LoRA run's "
                                     "(config key lora.rank > 0)")
  return tree["base"], tree["params"], tree.get("batch_stats", {})


def count(adapters: PyTree) -> int:
  """The number of trained values in ``adapters`` (``sum r * (in + out)``)."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(adapters))


__all__ = ["count", "init", "load", "merge", "targeted"]
