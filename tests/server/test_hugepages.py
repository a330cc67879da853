"""The arena that holds the fast path's packed weights in 2 MB pages (server/engine/hugepages.py)."""

from __future__ import annotations

import gc

import pytest
import torch

from server.engine import hugepages
from server.routes.ops import _huge_pages_bytes  # what /ready reports

needs_thp = pytest.mark.skipif(
    not hugepages.offered(), reason="this system offers no transparent huge pages"
)


def _huge_bytes() -> int:
    held = _huge_pages_bytes()
    assert held is not None, "no AnonHugePages line in /proc/self/smaps_rollup"
    return held


@pytest.fixture
def arena_on():
    before = hugepages.active()
    hugepages.use(True)
    yield
    hugepages.use(before)


@needs_thp
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.float16, torch.float32])
def test_copies_are_equal_aligned_and_apart(arena_on, dtype):
    tensors = [(torch.randn(n, 3) * 50).to(dtype) for n in (1, 7, 1000, 33)]
    copies = [hugepages.resident(t) for t in tensors]
    for t, c in zip(tensors, copies, strict=True):
        assert c is not t and c.dtype == t.dtype and c.shape == t.shape and c.is_contiguous()
        assert torch.equal(c, t)
        assert c.data_ptr() % hugepages.ALIGN == 0
    copies[0].fill_(1)  # pieces of one chunk do not overlap
    for t, c in zip(tensors[1:], copies[1:], strict=True):
        assert torch.equal(c, t)


@needs_thp
def test_a_transposed_tensor_is_copied_in_its_logical_order(arena_on):
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    c = hugepages.resident(t)
    assert c.is_contiguous() and torch.equal(c, t)


@needs_thp
def test_memory_is_in_2mb_pages_and_a_large_tensor_frees_its_own(arena_on):
    before = _huge_bytes()
    big = hugepages.resident(torch.ones(48 << 20, dtype=torch.uint8))  # over half a chunk
    held = _huge_bytes() - before
    assert held >= 32 << 20, f"only {held} bytes in 2 MB pages after a 48 MB copy"
    del big
    gc.collect()
    assert _huge_bytes() - before < held


def test_off_returns_the_tensor_itself():
    before = hugepages.active()
    hugepages.use(False)
    try:
        t = torch.ones(10)
        assert hugepages.resident(t) is t
        assert not hugepages.active()
    finally:
        hugepages.use(before)


def test_empty_and_non_cpu_tensors_pass_through(arena_on):
    t = torch.zeros(0, 4)
    assert hugepages.resident(t) is t
    meta = torch.empty(4, device="meta")
    assert hugepages.resident(meta) is meta
