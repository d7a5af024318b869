"""Metrics over per-example statistics, the aggregate score, and seeded bootstrap CIs.

Each example contributes a row of statistics (e.g. [correct] or [loglik_sum, n_tokens]); a metric
reduces the column sums of the rows, so bootstrap resamples reduce the same way (vectorized).

Aggregate (higher is better): the weighted mean of per-task *scores*, where a task's score is its
metric value if higher is better, 1/value for perplexities (the geometric-mean per-token probability,
in (0, 1]) and -value for any other lower-is-better metric.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

LN2 = math.log(2.0)


@dataclass(frozen=True)
class Metric:
    """A named metric: `reduce(column_sums, n)` over per-example stats, or `items_fn` over raw items."""

    name: str
    higher_is_better: bool
    reduce: Callable[[np.ndarray, int], np.ndarray] | None = None
    items_fn: Callable[[list], float] | None = None  # generic lm-eval aggregation (no vectorized form)

    def value(self, stats) -> float:
        """The metric over all rows of `stats` (an (n, k) array, or a list of items for items_fn)."""
        if self.reduce is None:
            return float(self.items_fn(list(stats)))
        return float(self.reduce(np.asarray(stats, dtype=np.float64).sum(axis=0), len(stats)))


def _mean(sums, n):
    return sums[..., 0] / n


def _perplexity_of_sums(sums, n):
    return np.exp(-sums[..., 0] / sums[..., 1])


def _perplexity_of_mean(sums, n):
    return np.exp(-sums[..., 0] / n)


def _bits_per_byte(sums, n):
    return -sums[..., 0] / sums[..., 1] / LN2


# Native metrics and their per-example stats columns.
NATIVE_METRICS = {
    "acc": Metric("acc", True, _mean),  # [chosen == gold]
    "acc_norm": Metric("acc_norm", True, _mean),  # [chosen by loglik per character == gold]
    "exact_match": Metric("exact_match", True, _mean),  # [normalized output == normalized target]
    "loglikelihood": Metric("loglikelihood", True, _mean),  # [sum of continuation token logprobs]
    "perplexity": Metric("perplexity", False, _perplexity_of_sums),  # [loglik sum, n tokens]
}

# Smooth proxies of the step-function metrics, for a search objective (`Evaluator(proxy=True)`).
PROXY_METRICS = {
    "target_prob": Metric("target_prob", True, _mean),  # generate: [p(target | prompt), teacher-forced]
    "choice_prob": Metric("choice_prob", True, _mean),  # multiple choice: [softmax over choices, at the gold]
}

# lm-eval aggregation functions (by __name__) that reduce column sums of their items.
LM_EVAL_REDUCERS = {
    "mean": (_mean, 1),
    "perplexity": (_perplexity_of_mean, 1),
    "weighted_perplexity": (_perplexity_of_sums, 2),
    "bits_per_byte": (_bits_per_byte, 2),
}


def to_score(metric: Metric, value):
    """A metric value on the higher-is-better aggregate scale (value, 1/perplexity, or -value)."""
    if metric.higher_is_better:
        return value
    if "perplexity" in metric.name:
        return 1.0 / np.asarray(value) if isinstance(value, np.ndarray) else 1.0 / value
    return -value


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    """Σ wᵢ vᵢ / Σ wᵢ."""
    w = np.asarray(weights, dtype=np.float64)
    return float(np.dot(w, np.asarray(values, dtype=np.float64)) / w.sum())


def bootstrap_values(metric: Metric, stats, iters: int, rng: np.random.Generator, block: int = 128) -> np.ndarray:
    """`iters` metric values over resamples (with replacement) of the examples."""
    n = len(stats)
    out = np.empty(iters, dtype=np.float64)
    if metric.reduce is None:
        items = list(stats)
        for b in range(iters):
            idx = rng.integers(0, n, size=n)
            out[b] = metric.items_fn([items[i] for i in idx])
        return out
    arr = np.asarray(stats, dtype=np.float64)
    for lo in range(0, iters, block):
        hi = min(iters, lo + block)
        idx = rng.integers(0, n, size=(hi - lo, n))
        out[lo:hi] = metric.reduce(arr[idx].sum(axis=1), n)
    return out


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile bootstrap interval of `samples` at `level`."""
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(samples, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


# --- exact-match normalization -------------------------------------------------------------------

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
NORMALIZERS: dict[str, Callable[[str], str]] = {
    "strip": str.strip,
    "lower": str.lower,
    "remove_punctuation": lambda s: _PUNCT.sub("", s),
    "collapse_whitespace": lambda s: " ".join(s.split()),
}


def normalize(text: str, steps: Sequence[str]) -> str:
    """`text` passed through the named normalizers in order."""
    for step in steps:
        text = NORMALIZERS[step](text)
    return text


def truncate_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to (excluding) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]
