"""Choosing the winner: the top candidates by search score, re-ranked on the validation split.

The search split is small, and the best search scores of a long run are partly luck: the finalists'
search scores overstate what they generalise to. When the top ones' mean search-minus-validation gap
is larger than the validation score's own noise (twice its binomial standard error), the selection is
widened to ``WIDEN`` times as many finalists, so that a candidate ranked lower on the search split but
better on validation can still win. The gap is reported either way. The default recipe's trial is
always a finalist, so the winner is never worse on validation than where the search started.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import optuna

from evomerge.search.run import best_trials, trial_score

WIDEN = 3  # how many times top_k the finalists become when the search split overfits


@dataclass
class Selection:
    """The winner, every finalist's validation score (best first), and the overfitting check."""

    winner: optuna.trial.FrozenTrial
    validation: float
    ranked: list[tuple[optuna.trial.FrozenTrial, float]]
    gap: float  # mean search minus validation score of the first top_k finalists
    threshold: float  # a gap above this counts as overfitting the search split
    widened: bool  # whether the finalists were widened because of it

    def describe(self) -> str:
        """One sentence for a report."""
        verdict = (f"above the validation noise ({self.threshold:.3f}): re-ranked {len(self.ranked)} finalists"
                   if self.widened else f"within the validation noise ({self.threshold:.3f})")
        return f"Finalists' mean search-minus-validation gap {self.gap:+.3f}, {verdict}."


def noise_threshold(validation: float, n_examples: int) -> float:
    """Twice the binomial standard error of an aggregate score in [0, 1] over ``n_examples`` examples."""
    p = min(max(validation, 0.0), 1.0)
    return 2.0 * math.sqrt(max(p * (1.0 - p), 0.01) / max(n_examples, 1))


def select_winner(study: optuna.Study, top_k: int, validate: Callable[[optuna.trial.FrozenTrial], float],
                  n_validation: int, within: int | None = None) -> Selection:
    """Re-rank the top ``top_k`` trials (of the first ``within``) and the default recipe's by ``validate``;
    widen to ``WIDEN``·top_k when the top ones overfit the search split."""
    top = best_trials(study, top_k, within=within)
    if not top:
        raise RuntimeError("no trial completed; nothing to export (see trials.csv for failure reasons)")
    scores = {t.number: validate(t) for t in top}
    gap = sum(trial_score(t) - scores[t.number] for t in top) / len(top)
    threshold = noise_threshold(sum(scores.values()) / len(scores), n_validation)
    widened = gap > threshold
    finalists = _with_default(study, best_trials(study, WIDEN * top_k, within=within) if widened else top, within)
    scores.update({t.number: validate(t) for t in finalists if t.number not in scores})
    ranked = sorted(((t, scores[t.number]) for t in finalists), key=lambda x: x[1], reverse=True)
    return Selection(ranked[0][0], ranked[0][1], ranked, gap, threshold, widened)


def _with_default(study: optuna.Study, finalists: list, within: int | None) -> list:
    """The finalists plus the default recipe's trial (last), when it completed: a search's winner then never
    does worse on validation than the recipe it started from."""
    default = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
               if t.user_attrs.get("default") and (within is None or t.number < within)]
    return finalists + [t for t in default if t.number not in {f.number for f in finalists}]
