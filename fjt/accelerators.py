"""Determinism and matmul precision: explicit, because XLA's GPU defaults differ from the CPU's.

On the CPU, XLA's reductions are deterministic and float32 matmuls are full float32. On a GPU,
XLA may reduce in a non-deterministic order (atomics; scatter-adds) and runs float32 matmuls as
TF32. ``config.deterministic`` (default true) adds ``--xla_gpu_deterministic_ops=true`` to
``XLA_FLAGS``, which XLA reads once, when JAX starts its backends: ``request_determinism``
must run before that (``scripts/train.py`` calls it first thing). ``config.matmul_precision``
(``default`` | ``high`` | ``highest``) is ``jax.default_matmul_precision`` around a run's
tracing (``precision``).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import jax

DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"
PRECISIONS = ("default", "high", "highest")


def _backends_started() -> bool:
  from jax._src import xla_bridge
  return xla_bridge.backends_are_initialized()


def deterministic_ops() -> bool:
  """Whether ``XLA_FLAGS`` asks for ``DETERMINISTIC_FLAG`` (so GPU kernels that reduce in a
  non-deterministic order are avoided; see ``fjt.models.gpt.attention_implementation``)."""
  return DETERMINISTIC_FLAG in os.environ.get("XLA_FLAGS", "")


def request_determinism(deterministic: bool) -> None:
  """Adds ``DETERMINISTIC_FLAG`` to ``XLA_FLAGS`` if ``deterministic`` (a no-op on CPU and TPU,
  whose ops are deterministic already). When JAX's backends have started without it, a GPU
  run says in one line that it is not deterministic; other platforms need nothing."""
  flags = os.environ.get("XLA_FLAGS", "")
  if not deterministic or DETERMINISTIC_FLAG in flags:
    return
  if not _backends_started():
    os.environ["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_FLAG}".strip()
  elif jax.default_backend() == "gpu":
    print(f"fjt: config.deterministic is true but JAX's GPU backend started without "
          f"{DETERMINISTIC_FLAG}; set it in XLA_FLAGS before JAX starts (scripts/train.py does)",
          file=sys.stderr, flush=True)


@contextlib.contextmanager
def precision(matmul_precision: str) -> Iterator[None]:
  """``jax.default_matmul_precision(matmul_precision)`` inside, unless ``"default"`` (the
  platform's own: float32 on CPU, TF32 on recent NVIDIA GPUs, bfloat16 passes on TPU)."""
  if matmul_precision not in PRECISIONS:
    raise ValueError(f"matmul precision must be one of {PRECISIONS}, got {matmul_precision!r}")
  if matmul_precision == "default":
    yield
  else:
    with jax.default_matmul_precision(matmul_precision):
      yield
