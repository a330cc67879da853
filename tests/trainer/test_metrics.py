import pytest

from trainer.metrics import aggregate, best_over_references, exact_match, normalize_answer, token_f1


def test_normalize_answer_follows_squad():
    assert normalize_answer("  The Eiffel-Tower, in PARIS!  ") == "eiffeltower in paris"
    assert normalize_answer("an apple a day") == "apple day"


def test_exact_match():
    assert exact_match("Paris.", "paris") == 1.0
    assert exact_match("The Paris", "Paris") == 1.0
    assert exact_match("Paris France", "Paris") == 0.0


def test_token_f1_hand_computed():
    # pred tokens: [paris, is, capital]; ref: [capital, is, paris, france]; overlap 3
    # precision 3/3, recall 3/4 -> F1 = 2 * 1 * 0.75 / 1.75 = 6/7
    assert token_f1("Paris is the capital", "the capital is Paris, France") == pytest.approx(6 / 7)
    # repeated tokens count by multiset: pred [a1, a1, b], ref [a1, b, c]: overlap 2
    # precision 2/3, recall 2/3 -> 2/3
    assert token_f1("x x y", "x y z") == pytest.approx(2 / 3)
    assert token_f1("cat", "dog") == 0.0


def test_token_f1_empty_answers():
    assert token_f1("", "") == 1.0
    assert token_f1("the", "") == 1.0  # both normalise to nothing
    assert token_f1("", "Paris") == 0.0


def test_aggregate_and_best_reference():
    out = aggregate(["Paris", "4", "dog"], ["paris", "four", "dog"])
    assert out["exact_match"] == pytest.approx(2 / 3)
    assert out["token_f1"] == pytest.approx(2 / 3)
    assert out["n"] == 3
    assert best_over_references(exact_match, "4", ["four", "4"]) == 1.0
    with pytest.raises(ValueError, match="pair up"):
        aggregate(["a"], [])
