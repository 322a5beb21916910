"""Model soups (Wortsman et al., 2022): the uniform mean of fine-tuned models, and the greedy
soup that keeps a candidate only if the soup's score does not drop.

The greedy soup is not a registered rule: it needs an evaluator, not a per-leaf reduction
(``fjt.merge`` offers it as its own method, ``"greedy"``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fjt.aggregate.checks import _as_list
from fjt.aggregate.finite import _prepare, check_finite
from fjt.aggregate.mean import mean
from fjt.state import PyTree


def uniform_soup(trees: Sequence[PyTree], integer_policy: str = "max") -> PyTree:
  """The uniform model soup: ``mean(trees)`` of fine-tuned models sharing one initialization."""
  return mean(trees, integer_policy=integer_policy)


def greedy_soup(candidates: Sequence[PyTree], evaluate: Callable[[PyTree], float],
                integer_policy: str = "max") -> tuple[PyTree, list[int], list[dict[str, Any]]]:
  """Greedy model soup (Wortsman et al., 2022): ``evaluate(tree) -> float``, higher is better.

  Candidates are ranked by their own score; the soup starts as the best one, and each next
  candidate is kept if the uniform mean of the kept ones plus it scores at least as well.

  Returns:
    ``(soup, chosen, log)``: the soup (a tree like the candidates), the indices of the candidates
    in it (in the order added), and one dict per candidate in rank order with ``candidate``,
    ``score`` (its own), ``soup_score`` (of the soup tried with it) and ``kept``.
  """
  candidates = _as_list(candidates, "candidates")
  _prepare(candidates, integer_policy, None)  # A mismatch fails before any evaluation.
  check_finite(candidates, [f"candidate {i}" for i in range(len(candidates))])  # Not "input 1" of a trial.

  def score_of(tree: PyTree, what: str) -> float:
    score = float(evaluate(tree))
    if not np.isfinite(score):
      raise ValueError(f"evaluate returned {score} for {what}; scores must be finite")
    return score

  scores = [score_of(c, f"candidate {i}") for i, c in enumerate(candidates)]
  ranked = sorted(range(len(candidates)), key=lambda i: -scores[i])
  chosen, best = [ranked[0]], scores[ranked[0]]
  soup = mean([candidates[ranked[0]]], integer_policy=integer_policy)
  log = [{"candidate": ranked[0], "score": best, "soup_score": best, "kept": True}]
  for i in ranked[1:]:
    trial = mean([candidates[j] for j in chosen + [i]], integer_policy=integer_policy)
    trial_score = score_of(trial, f"the soup of candidates {chosen + [i]}")
    kept = trial_score >= best
    log.append({"candidate": i, "score": scores[i], "soup_score": trial_score, "kept": kept})
    if kept:
      soup, best = trial, trial_score
      chosen.append(i)
  return soup, chosen, log
