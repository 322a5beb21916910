"""One registry of named aggregation rules, read by every place that aggregates.

A rule's core is one traceable per-leaf reduction over a leading model axis::

  @fjt.aggregate.register("max_abs")
  def max_abs(x, w):
    '''The value of largest |w_j x_j| per coordinate.'''
    i = jnp.argmax(jnp.abs(fjt.aggregate.per_row(w, x) * x), axis=0)
    return jnp.take_along_axis(x, i[None], axis=0)[0]

``reduce(x, w, **params) -> leaf``: ``x`` ``(N, ...)`` one floating leaf of N models stacked,
``w`` ``(N,)`` their weights, both in the accumulation dtype (float32, float64 for float64
leaves); it returns the ``(...)`` aggregate in that dtype, cast back to the leaf's dtype by the
caller. Only the ratios of the weights may matter (lists of trees pass them scaled by a power
of two). Keyword parameters with defaults (``trim=0.1``) are the rule's declared parameters; the
first line of its docstring is its help. Integer and bool leaves never reach ``reduce``: they
follow ``integer_policy`` as in ``fjt.aggregate.mean``.

From that one definition the rule serves, by name:
  * lists of trees in memory: ``aggregate_trees(name, trees, weights)`` (structure, shape and
    dtype checks and NaN/Inf handling of ``mean``);
  * replica rounds: ``aggregate_stacked(name, tree, weights)`` inside the jitted round
    (``fjt.replicas.make_round(..., aggregate=name)``, config key ``replicas.aggregate``);
  * checkpoints: ``fjt.merge.average_checkpoints(..., method=name)`` and
    ``scripts/average.py --method name`` (``--plugin MODULE`` imports a module that registers).

A rule may also take, as keyword-only arguments without defaults, the per-leaf inputs that
model merges need (``fjt.aggregate.ties``, ``dare``): ``base`` (the base model's leaf ``(...)``
in the accumulation dtype, from which task vectors ``x_j - base`` are taken; callers then pass
``base=``, a tree like the inputs) and ``leaf_id`` (an int fixed by the leaf's path, the same
in memory, streamed in groups of leaves or stacked, to seed per-leaf randomness).

The registry is per process: a multi-process run registers its rules in every process (import
the module that registers them) before ``fjt.replicas.fit`` reads ``replicas.aggregate``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fjt.aggregate.checks import (_acc_dtype, _check_weights, _input_names, _is_floating,
                                  _weights_array)
from fjt.aggregate.finite import _check_result, check_finite, _kept_inputs, _nonfinite_inputs, _prepare
from fjt.aggregate.leaves import _finite_sum, _integer_leaf, _stack
from fjt.config import ConfigError
from fjt.state import PyTree

INPUTS = ("base", "leaf_id")  # Per-leaf inputs a rule may take besides (x, w) and its params.

Reduce = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True, eq=False)  # Hashed by identity: a static jit argument.
class Rule:
  """A registered aggregation rule.

  Attributes:
    name: the name it is registered under.
    reduce: ``reduce(x (N, ...), w (N,), **params) -> (...)`` in the accumulation dtype.
    params: the declared parameters and their defaults (``reduce``'s keyword arguments).
    doc: one line, for ``--help`` and error messages.
    trees: an implementation over lists of trees with the same math, where one exists that is
      faster than stacking each leaf (``mean``'s fused loop);
      ``trees(trees, weights, integer_policy, on_nonfinite, **params) -> tree``.
    inputs: the per-leaf inputs of ``INPUTS`` that ``reduce`` takes (``base``, ``leaf_id``).
  """
  name: str
  reduce: Reduce
  params: Mapping[str, Any]
  doc: str
  trees: Callable[..., PyTree] | None = None
  inputs: frozenset[str] = frozenset()

  @property
  def needs_base(self) -> bool:
    """Whether the rule merges task vectors relative to a base model (``base=`` is required)."""
    return "base" in self.inputs

  def bind(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """The declared parameters with ``params`` over their defaults; an undeclared one raises."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(self.params))
    if unknown:
      raise ValueError(f"aggregation rule {self.name!r} has no parameter {unknown[0]!r}; its "
                       f"parameters: {sorted(self.params) or 'none'}")
    return {**self.params, **params}

  def leaf(self, x: jax.Array, w: jax.Array, params: Mapping[str, Any],
           base: jax.Array | None = None, leaf_id: int = 0) -> jax.Array:
    """The rule on one floating stacked leaf ``x`` ``(N, ...)``: reduced in the accumulation
    dtype with weights ``w`` ``(N,)`` (and the base's leaf ``(...)`` and the leaf's id, for
    rules that take them), cast back to ``x.dtype``."""
    acc = _acc_dtype(x.dtype)
    inputs = {}
    if "base" in self.inputs:
      inputs["base"] = base.astype(acc)
    if "leaf_id" in self.inputs:
      inputs["leaf_id"] = leaf_id
    return self.reduce(x.astype(acc), w.astype(acc), **params, **inputs).astype(x.dtype)


RULES: dict[str, Rule] = {}
_ALIASES: dict[str, str] = {}


def register(name: str, *, aliases: Sequence[str] = (), trees: Callable[..., PyTree] | None = None
             ) -> Callable[[Reduce], Reduce]:
  """Decorator: registers ``reduce`` as the rule ``name`` (and ``aliases``, other names of it).

  ``reduce(x, w, *, p=default, ...)``, see the module docstring. Registering a name again
  replaces the rule (e.g. re-running a notebook cell).
  """
  def decorator(reduce: Reduce) -> Reduce:
    signature = inspect.signature(reduce)
    positional = [p for p in signature.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                  and p.default is p.empty]
    if len(positional) != 2:
      raise TypeError(f"aggregation rule {name!r}: reduce must take (x, w, **params), got "
                      f"{reduce.__name__}{signature}")
    keywords = [p for p in signature.parameters.values() if p.kind == p.KEYWORD_ONLY]
    inputs = frozenset(p.name for p in keywords if p.default is p.empty)
    if not inputs <= set(INPUTS):
      raise TypeError(f"aggregation rule {name!r}: keyword arguments without a default must be "
                      f"among {INPUTS}, got {sorted(inputs - set(INPUTS))}")
    params = {p.name: p.default for p in signature.parameters.values()
              if p.default is not p.empty}
    doc = (inspect.getdoc(reduce) or name).splitlines()[0]
    RULES[name] = Rule(name, reduce, params, doc, trees, inputs)
    _ALIASES.pop(name, None)  # A rule's own name wins over an older alias.
    _ALIASES.update({alias: name for alias in aliases})
    return reduce

  return decorator


def rule_names(aliases: bool = False) -> list[str]:
  """The registered rules' names, sorted; with ``aliases``, their other names after them."""
  return sorted(RULES) + (sorted(_ALIASES) if aliases else [])


def get_rule(name: str | Rule, key: str | None = None) -> Rule:
  """The rule registered as ``name`` (or an alias of it). An unknown name raises ValueError
  listing the known ones; with ``key`` (a config key) a ``ConfigError`` naming it."""
  if isinstance(name, Rule):
    return name
  rule = RULES.get(_ALIASES.get(name, name)) if isinstance(name, str) else None
  if rule is None:
    where = f"config key {key!r}: " if key else ""
    error = ConfigError if key else ValueError
    raise error(f"{where}unknown aggregation rule {name!r}; known: {rule_names()} (register "
                "others with fjt.aggregate.register)")
  return rule


def leaf_id(path: str) -> int:
  """The id of the leaf at ``path`` ('/'-joined, from the root of the tree merged): its CRC-32,
  so the same leaf has the same id whichever leaves are merged with it."""
  return zlib.crc32(path.encode()) & 0x7FFFFFFF  # A non-negative int32 for jax.random.fold_in.


def _with_sharding_of(out: jax.Array, sharding: jax.sharding.Sharding | None) -> jax.Array:
  """``out`` constrained to an input's sharding: a rule that flattens or sorts a leaf (TIES's
  top-k) must not leave the result gathered on one device."""
  if isinstance(sharding, jax.sharding.NamedSharding) and len(sharding.device_set) > 1:
    return jax.lax.with_sharding_constraint(out, sharding)
  return out


@functools.partial(jax.jit, static_argnames=("rule", "params", "integer_policy", "leaf_ids",
                                             "shardings"))
def _rule_leaves(leaves: list[list[jax.Array]], weights: jax.Array, rule: Rule,
                 params: tuple[tuple[str, type, Any], ...], integer_policy: str,
                 base: list[jax.Array] | None = None, leaf_ids: tuple[int, ...] | None = None,
                 shardings: tuple[Any, ...] | None = None
                 ) -> tuple[list[jax.Array], jax.Array]:
  """``rule`` on each column of leaves, stacked; a bool per leaf (floating: result finite;
  integer: all inputs equal). ``params`` hold their types: 1 and 1.0 are equal static keys."""
  outs, oks = [], []
  for k, column in enumerate(zip(*leaves)):
    if _is_floating(column[0].dtype):
      out = rule.leaf(jnp.stack(column), weights, {k: v for k, _, v in params},
                      None if base is None else base[k], 0 if leaf_ids is None else leaf_ids[k])
      out = _with_sharding_of(out, None if shardings is None else shardings[k])
      outs.append(out)
      oks.append(_finite_sum(out))  # Inputs are checked before: this catches overflow.
    else:
      out, equal = _integer_leaf(column, integer_policy)
      outs.append(out)
      oks.append(equal)
  return outs, _stack(oks)


def aggregate_trees(name: str | Rule, trees: Sequence[PyTree],
                    weights: Sequence[float] | None = None, integer_policy: str = "max",
                    on_nonfinite: str = "error", params: Mapping[str, Any] | None = None,
                    base: PyTree | None = None) -> PyTree:
  """The rule ``name`` applied leaf by leaf to N pytrees, with ``params`` over its defaults.

  Each floating leaf's N values are stacked ``(N, ...)`` and reduced in float32 (float64 for
  float64 leaves), then cast back. Validation (``check_compatible``), weights (non-negative, a
  positive sum, default equal), integer leaves and NaN/Inf handling as ``fjt.aggregate.mean``;
  a rule with a faster implementation over lists (``mean``) uses it. ``base``: the base model
  (a tree like the inputs, checked too) of a rule that merges task vectors (``ties``,
  ``dare``), required by those and refused by the others. Results keep the inputs' shardings.
  """
  rule = get_rule(name)
  params = rule.bind(params)
  if rule.needs_base and base is None:
    raise ValueError(f"aggregation rule {rule.name!r} merges task vectors: pass base=, the "
                     "base model the inputs were fine-tuned from")
  if base is not None and not rule.needs_base:
    raise ValueError(f"aggregation rule {rule.name!r} takes no base model; rules that do: "
                     f"{[n for n in rule_names() if RULES[n].needs_base]}")
  if rule.trees is not None:
    return rule.trees(trees, weights, integer_policy, on_nonfinite, **params)
  if base is not None:
    _prepare([base] + list(trees), integer_policy, None, ["base"] + _input_names(len(trees)))
    check_finite([base], ["base"])
  flats, names = _prepare(trees, integer_policy, on_nonfinite)
  weights = _check_weights(weights, len(flats))
  kept = _kept_inputs(_nonfinite_inputs(flats), names, on_nonfinite)
  if weights[kept].sum() <= 0:
    raise ValueError("every input with a positive weight has a non-finite value (NaN or Inf)")
  flats, names, weights = [flats[i] for i in kept], [names[i] for i in kept], weights[kept]
  ids = tuple(map(leaf_id, flats[0].paths)) if "leaf_id" in rule.inputs else None
  shardings = tuple(getattr(x, "sharding", None) for x in flats[0].leaves)
  out, ok = _rule_leaves([f.leaves for f in flats], _weights_array(weights), rule,
                         tuple((k, type(v), v) for k, v in sorted(params.items())),
                         integer_policy, None if base is None else jax.tree.leaves(base), ids,
                         shardings)
  _check_result(ok, out, flats, names, rule.name)
  return flats[0].treedef.unflatten(out)


def describe() -> str:
  """One line per registered rule: its name, parameters and help (for ``--help``)."""
  lines = []
  for name in rule_names():
    rule = RULES[name]
    aliases = [a for a, n in _ALIASES.items() if n == name]
    extra = ", ".join([f"alias {a}" for a in aliases] +
                      [f"{p}={v!r}" for p, v in rule.params.items()])
    lines.append(f"{name}{f' ({extra})' if extra else ''}: {rule.doc}")
  return "\n".join(lines)


__all__ = ["INPUTS", "RULES", "Rule", "aggregate_trees", "describe", "get_rule", "leaf_id",
           "register", "rule_names"]
