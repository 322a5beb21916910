"""Temporal weight averaging of a run's own weights: EMA and SWA, inside the train step.

Both average the model variables ``{"params", "batch_stats"}`` in float32:

- EMA: ``ema <- decay * ema + (1 - decay) * w`` after every step, starting from
  the initial weights.
- SWA: the uniform mean of the weights after steps ``start, start + every, ...``,
  updated as a running mean ``swa <- swa + (w - swa) / (n + 1)``. BatchNorm
  statistics are averaged the same way; ``fjt.aggregate.recompute_batch_stats``
  re-estimates them exactly when that matters (as ``torch.optim.swa_utils.update_bn``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


@dataclasses.dataclass(frozen=True)
class TemporalAveraging:
  """Which averages a run keeps. ``ema_decay`` 0 disables EMA; ``swa_every`` 0 disables SWA."""
  ema_decay: float = 0.0
  swa_start: int = 0
  swa_every: int = 0

  @classmethod
  def from_config(cls, config) -> TemporalAveraging:
    """The averages of ``config.ema`` / ``config.swa`` (read by ``fjt.options.AveragingOptions``)."""
    from fjt.options import AveragingOptions
    return cls.from_options(AveragingOptions.from_config(config))

  @classmethod
  def from_options(cls, options) -> TemporalAveraging:
    """From a ``fjt.options.AveragingOptions``."""
    return cls(options.ema_decay, options.swa_start, options.swa_every)

  @property
  def names(self) -> tuple[str, ...]:
    return (("ema",) if self.ema_decay else ()) + (("swa",) if self.swa_every else ())

  def init(self, variables: PyTree) -> dict[str, PyTree]:
    """``{"ema": variables, "swa": zeros, "swa_count": 0}`` for the enabled averages."""
    # Copies: the averages must not share buffers with the (donated) variables.
    f32 = lambda tree: jax.tree.map(lambda a: jnp.array(a, jnp.float32, copy=True), tree)
    averages = {}
    if self.ema_decay:
      averages["ema"] = f32(variables)
    if self.swa_every:
      averages["swa"] = jax.tree.map(jnp.zeros_like, f32(variables))
      averages["swa_count"] = jnp.zeros((), jnp.int32)
    return averages

  def update(self, averages: dict[str, PyTree], variables: PyTree, step: jax.Array) -> dict[str, PyTree]:
    """The averages after the step that produced ``variables``; ``step`` counts steps
    taken, including that one. Pure and traceable: called inside the jitted step."""
    averages = dict(averages)
    if self.ema_decay:
      d = self.ema_decay
      averages["ema"] = jax.tree.map(lambda e, w: d * e + (1.0 - d) * w.astype(jnp.float32),
                                     averages["ema"], variables)
    if self.swa_every:
      take = (step >= self.swa_start) & ((step - self.swa_start) % self.swa_every == 0)
      count = averages["swa_count"]

      def add(swa):
        n = (count + 1).astype(jnp.float32)
        return jax.tree.map(lambda s, w: s + (w.astype(jnp.float32) - s) / n, swa, variables)

      averages["swa"] = jax.lax.cond(take, add, lambda swa: swa, averages["swa"])
      averages["swa_count"] = count + take.astype(jnp.int32)
    return averages
