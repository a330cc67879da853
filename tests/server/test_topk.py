"""Block-wise top-k and argmax (server/engine/topk.py) against torch's own operators."""

from __future__ import annotations

import pytest
import torch

from server.engine.topk import BLOCK, MIN_BLOCKED, argmax_rows, top_k_indices


def _rows(seed: int, rows: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g)


@pytest.mark.parametrize("vocab", [262144, 49152, MIN_BLOCKED])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_top_k_and_argmax_match_torch(vocab, rows):
    for seed in range(4):
        x = _rows(seed, rows, vocab)
        if seed == 1:
            x = (x * 2).round()  # thousands of ties, within and across blocks
        if seed == 2:
            x[:, 7] = x.max() + 1  # the maximum twice in a row, in different blocks
            x[:, vocab - 3] = x.max()
        assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
        for k in (1, 64):
            got = top_k_indices(x, k)
            assert got.shape == (rows, k)
            assert all(len(set(r)) == k for r in got.tolist())  # k distinct indices
            want = x.topk(k, dim=-1).values.sort(dim=-1).values
            assert torch.equal(x.gather(1, got).sort(dim=-1).values, want)


def test_nan_counts_as_the_largest_value_as_in_torch():
    x = _rows(5, 2, 262144)
    x[0, 123_456] = float("nan")
    x[1, 9] = float("nan")
    x[1, 200_000] = float("nan")
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    got = top_k_indices(x, 4)
    assert 123_456 in got[0].tolist() and {9, 200_000} <= set(got[1].tolist())


def test_small_or_uneven_vocabularies_take_torch_operators():
    for vocab in (100, MIN_BLOCKED + 1, MIN_BLOCKED - BLOCK):
        x = _rows(0, 3, vocab)
        assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
        assert torch.equal(top_k_indices(x, 5), x.topk(5, dim=-1).indices)
    x = _rows(1, 4, MIN_BLOCKED * 2)[:, ::2]  # not contiguous
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
