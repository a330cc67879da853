"""The weights a decode step reads, in 2 MB pages where Linux offers them.

A decode step on the CPU kernel reads every 4-bit weight of the model, the logits' int4
screen and each row's 8-bit LoRA blocks: some hundred MB over hundreds of tensors. In the
usual 4 KB pages that is tens of thousands of pages a step, far more than the TLB holds,
so the kernels' loads keep waiting on page-table walks. Linux backs memory with 2 MB pages
(transparent huge pages) where a program asks for them (madvise) or, set to `always`,
everywhere; in its default `madvise` mode ordinary allocations never get them.

`resident(t)` copies a tensor into chunks of memory asked for in 2 MB pages, many tensors
a chunk (one projection's weight is well under 2 MB; a tensor over half a chunk gets a
mapping of its own). A chunk lives as long as a tensor in it: the arena keeps only the one
it is filling, so weights that are dropped (an adapter pack replaced) free their chunk once
its other tensors are gone too.

Process-wide, as the memory it manages: `use(False)` (SWAPSERVE_HUGE_PAGES=off) keeps
ordinary memory, and so does a system whose transparent huge pages are `never`.
"""

from __future__ import annotations

import mmap
import threading
from pathlib import Path

import torch

PAGE = 2 << 20
CHUNK = 32 << 20  # one mapping serves many tensors; only the pages touched take memory
ALIGN = 64
_SYSFS = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def offered() -> bool:
    """Whether this system backs memory asked for with madvise in 2 MB pages."""
    try:
        mode = _SYSFS.read_text()
    except OSError:
        return False
    return hasattr(mmap, "MADV_HUGEPAGE") and "[never]" not in mode


class Arena:
    """Hands out tensors from 2 MB-aligned mappings advised as huge pages."""

    def __init__(self) -> None:
        self._chunk: torch.Tensor | None = None  # uint8 view of the mapping being filled
        self._used = 0
        self._lock = threading.Lock()

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of the CPU tensor ``t`` in the arena."""
        size = t.nbytes
        if size > CHUNK // 2:  # a mapping of its own, freed with the tensor
            out = _mapping(size)[:size]
        else:
            with self._lock:
                if self._chunk is None or self._used + size > len(self._chunk):
                    self._chunk, self._used = _mapping(size), 0
                out = self._chunk[self._used : self._used + size]
                self._used += (size + ALIGN - 1) // ALIGN * ALIGN
        out = out.view(t.dtype).view(t.shape)
        out.copy_(t)
        return out


def _mapping(at_least: int) -> torch.Tensor:
    size = max(CHUNK, (at_least + PAGE - 1) // PAGE * PAGE)
    # anonymous and private (a shared mapping is shmem, which has a switch of its own),
    # with one page to spare to start on a 2 MB boundary
    mapped = mmap.mmap(-1, size + PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapped.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(mapped, dtype=torch.uint8)  # keeps the mapping alive
    start = -whole.data_ptr() % PAGE
    return whole[start : start + size]


_arena = Arena()
_on = offered()


def use(on: bool) -> None:
    """Turn the arena on (where the system offers huge pages) or off, for what is packed
    from now on."""
    global _on
    _on = on and offered()


def active() -> bool:
    return _on


def resident(t: torch.Tensor) -> torch.Tensor:
    """``t`` where the arena is on (a copy in 2 MB pages), else ``t`` itself."""
    if not _on or t.device.type != "cpu" or t.nbytes == 0:
        return t
    return _arena.copy(t.contiguous())
