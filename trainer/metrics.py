"""Answer-quality metrics shared by the trainer's eval and the A/B experiments.

SQuAD-style: lower-case, drop punctuation and the articles a/an/the, collapse whitespace,
then compare. Exact match is 0/1 per answer; token F1 is the harmonic mean of token
precision and recall over the multiset of normalised tokens.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation and articles, collapse whitespace (SQuAD v1.1)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Token-overlap F1 between the normalised prediction and reference.

    Two empty answers agree (1.0); an empty answer against a non-empty one scores 0.0.
    """
    pred_tokens = normalize_answer(prediction).split()
    ref_tokens = normalize_answer(reference).split()
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    common = Counter(pred_tokens) & Counter(ref_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def best_over_references(metric, prediction: str, references: Sequence[str]) -> float:
    """The best score of ``prediction`` against any of several acceptable references."""
    if not references:
        raise ValueError("at least one reference answer is needed")
    return max(metric(prediction, ref) for ref in references)


def aggregate(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean exact match and token F1 over paired predictions and references."""
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references: they must pair up"
        )
    n = len(predictions)
    if n == 0:
        return {"exact_match": 0.0, "token_f1": 0.0, "n": 0}
    em = sum(exact_match(p, r) for p, r in zip(predictions, references, strict=True)) / n
    f1 = sum(token_f1(p, r) for p, r in zip(predictions, references, strict=True)) / n
    return {"exact_match": em, "token_f1": f1, "n": n}
