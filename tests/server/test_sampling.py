"""Per-row sampling edge cases found by fuzzing the API (tests/server/test_fuzz.py)."""

from __future__ import annotations

import torch

from server.engine.base import SamplingParams
from server.engine.sampling import RowSampler, sample_rows


def test_a_vanishing_temperature_decodes_greedily_instead_of_failing():
    # 1e-300 overflowed logits / temperature to inf and softmax to NaN: torch.multinomial
    # raised, and the scheduler failed every row of the batch with it
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0], [1.0, 0.0, 4.0, 0.5]])
    tiny = RowSampler.create(SamplingParams(max_tokens=4, temperature=1e-300, seed=3), 0)
    normal = RowSampler.create(SamplingParams(max_tokens=4, temperature=0.0), 0)
    assert sample_rows(logits, [tiny, normal]) == [1, 2]


def test_non_finite_logits_fall_back_to_argmax_of_what_is_finite():
    logits = torch.tensor([float("nan"), 1.0, float("inf"), 0.0])
    sampler = RowSampler.create(SamplingParams(max_tokens=4, temperature=0.7, top_p=0.9), 0)
    assert sampler.sample(logits) == 2


def test_a_vanishing_top_p_keeps_the_top_token():
    # 1e-300 is 0.0 in float32: no token passed the `< top_p` test and multinomial raised
    logits = torch.tensor([0.5, 3.0, -1.0, 2.0])
    sampler = RowSampler.create(SamplingParams(max_tokens=4, temperature=1.0, top_p=1e-300), 0)
    assert {sampler.sample(logits) for _ in range(5)} == {1}
