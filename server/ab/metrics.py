"""Scores for A/B experiments: answer quality, paired bootstrap intervals, latency summaries.

Exact match and token F1 come from trainer/metrics.py, so an experiment and the trainer's
eval agree on what "correct" means; ROUGE-L is added here on the same normalised tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from trainer.metrics import best_over_references, exact_match, normalize_answer, token_f1

METRICS = ("exact_match", "token_f1", "rouge_l")


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence, one DP row at a time (O(len(a) * len(b)) time)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b, start=1):
            row.append(prev[j - 1] + 1 if x == y else max(prev[j], row[j - 1]))
        prev = row
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (beta = 1) on SQuAD-normalised tokens.

    Two empty answers agree (1.0), an empty answer against a non-empty one scores 0.0,
    the same convention as token F1.
    """
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision = lcs / len(pred)
    recall = lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def score_answer(prediction: str, references: Sequence[str]) -> dict[str, float]:
    """Every metric, each the best over the acceptable references."""
    return {
        "exact_match": best_over_references(exact_match, prediction, references),
        "token_f1": best_over_references(token_f1, prediction, references),
        "rouge_l": best_over_references(rouge_l, prediction, references),
    }


def _percentile_interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(samples, [alpha, 1.0 - alpha])
    return float(low), float(high)


def mean_ci(
    values: Sequence[float], *, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """Mean and a percentile bootstrap interval for it (seeded: a report is reproducible)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return {"mean": 0.0, "low": 0.0, "high": 0.0}
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_resamples, x.size))].mean(axis=1)
    low, high = _percentile_interval(means, confidence)
    return {"mean": float(x.mean()), "low": low, "high": high}


def paired_bootstrap(
    baseline: Sequence[float],
    treatment: Sequence[float],
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Difference of means (treatment - baseline) with a paired bootstrap interval.

    Paired: the same resampled questions are used for both arms, so the per-question
    difficulty cancels out and the interval is much tighter than two independent ones.
    """
    a = np.asarray(baseline, dtype=float)
    b = np.asarray(treatment, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"{a.size} baseline scores but {b.size} treatment scores: they must pair")
    if a.size == 0:
        return {"diff": 0.0, "low": 0.0, "high": 0.0, "n": 0}
    d = b - a
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_resamples, d.size))].mean(axis=1)
    low, high = _percentile_interval(means, confidence)
    return {"diff": float(d.mean()), "low": low, "high": high, "n": int(d.size)}


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """Mean, median and 95th percentile (linear interpolation between order statistics)."""
    x = np.asarray(seconds, dtype=float)
    if x.size == 0:
        return {"mean": 0.0, "p50": 0.0, "p95": 0.0}
    p50, p95 = np.percentile(x, [50, 95])
    return {"mean": float(x.mean()), "p50": float(p50), "p95": float(p95)}
