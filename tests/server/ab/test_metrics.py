"""A/B metrics against values worked out by hand."""

from __future__ import annotations

import pytest

from server.ab.metrics import (
    latency_summary,
    mean_ci,
    paired_bootstrap,
    rouge_l,
    score_answer,
)


def test_rouge_l_hand_computed():
    # pred "cat sat on mat" (4 tokens), ref "cat was on mat" (4): LCS "cat on mat" = 3,
    # P = R = 3/4, F = 0.75
    assert rouge_l("The cat sat on the mat.", "the cat was on the mat") == pytest.approx(0.75)
    # pred "paris france" (2), ref "capital is paris" (3): LCS 1, P 1/2, R 1/3, F = 0.4
    assert rouge_l("Paris, France", "capital is Paris") == pytest.approx(0.4)
    # order matters for LCS (unlike token F1): "y x" vs "x y" -> LCS 1, F = 0.5
    assert rouge_l("y x", "x y") == pytest.approx(0.5)
    assert rouge_l("", "") == 1.0
    assert rouge_l("", "x") == 0.0
    assert rouge_l("x", "y") == 0.0


def test_score_answer_takes_best_reference():
    scores = score_answer("Paris", ["the city of light", "paris"])
    assert scores == {"exact_match": 1.0, "token_f1": 1.0, "rouge_l": 1.0}
    # token F1 vs "paris is big": P 1, R 1/3 -> 0.5; no exact match anywhere
    scores = score_answer("Paris", ["London", "Paris is big"])
    assert scores["exact_match"] == 0.0
    assert scores["token_f1"] == pytest.approx(0.5)
    assert scores["rouge_l"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        score_answer("x", [])


def test_paired_bootstrap_constant_difference_is_exact():
    out = paired_bootstrap([0.0, 0.5, 1.0], [0.25, 0.75, 1.25])
    assert out["diff"] == pytest.approx(0.25)
    assert out["low"] == pytest.approx(0.25) and out["high"] == pytest.approx(0.25)
    assert out["n"] == 3


def test_paired_bootstrap_interval_and_seed():
    # differences [0, 1]: resampled means are 0, 0.5 or 1 (p = 1/4, 1/2, 1/4), so the
    # 2.5% and 97.5% quantiles of 1000 resamples are 0 and 1
    out = paired_bootstrap([1.0, 0.0], [1.0, 1.0])
    assert out["diff"] == pytest.approx(0.5)
    assert out["low"] == pytest.approx(0.0) and out["high"] == pytest.approx(1.0)
    a = [0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    b = [1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    assert paired_bootstrap(a, b, seed=3) == paired_bootstrap(a, b, seed=3)
    out = paired_bootstrap(a, b)
    assert out["diff"] == pytest.approx(0.25)
    assert out["low"] <= out["diff"] <= out["high"]
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 2.0])


def test_mean_ci_and_latency_summary():
    assert mean_ci([0.5, 0.5]) == {"mean": 0.5, "low": 0.5, "high": 0.5}
    # [1, 2, 3, 4]: mean 2.5, median 2.5, p95 = 1 + 0.95 * 3 = 3.85 (linear interpolation)
    out = latency_summary([4.0, 1.0, 3.0, 2.0])
    assert out == pytest.approx({"mean": 2.5, "p50": 2.5, "p95": 3.85})
    assert latency_summary([]) == {"mean": 0.0, "p50": 0.0, "p95": 0.0}
