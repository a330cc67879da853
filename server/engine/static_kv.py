"""A preallocated KV cache for the running batch of the fast path.

Per layer, keys and values live in one tensor each, (rows, kv_heads, capacity, head_dim).
Batch row i is cache row i, and each row holds its own tokens from column 0 at its own
length: a decode step writes every row's new key at that row's position, in place, and
attention reads columns up to each row's position under a causal mask. Nothing is padded
or concatenated per step, unlike a growing cache (server/engine/kv.py), which re-allocates
every layer's tensors at every step.

Rows join (``merge``: their prefilled keys are copied into free rows) and leave
(``select``: later rows move down), and the tensors grow, in steps, only when the rows or
the longest row outgrow them. The interface mirrors KVBatch, so the scheduler drives both
the same way.
"""

from __future__ import annotations

import torch

# capacity grows in multiples of this many positions (a few re-allocations per request)
CAPACITY_STEP = 256


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


class StaticKV:
    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], lengths: list[int]):
        self.keys = keys  # per layer (rows, kv_heads, capacity, head_dim)
        self.values = values
        self.lengths = lengths  # tokens held, per batch row

    @classmethod
    def empty(
        cls,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        rows: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> StaticKV:
        shape = (max(1, rows), kv_heads, max(1, capacity), head_dim)
        keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        return cls(keys, values, [])

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def row_capacity(self) -> int:
        return int(self.keys[0].shape[0])

    @property
    def capacity(self) -> int:
        return int(self.keys[0].shape[2])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def reserve(self, rows: int, capacity: int) -> None:
        """Make room for ``rows`` rows of ``capacity`` positions (grows, never shrinks)."""
        old_rows, old_cap = self.row_capacity, self.capacity
        if rows <= old_rows and capacity <= old_cap:
            return
        new_rows = max(old_rows, rows if rows <= old_rows else max(rows, 2 * old_rows))
        new_cap = max(old_cap, _round_up(capacity, CAPACITY_STEP))
        n = self.batch_size
        used = max(self.lengths, default=0)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                shape = (new_rows, old.shape[1], new_cap, old.shape[3])
                new = torch.zeros(shape, dtype=old.dtype, device=old.device)
                new[:n, :, :used] = old[:n, :, :used]
                store[i] = new

    def ensure_step(self) -> None:
        """Room for one more token in every row (before a decode step)."""
        longest = max(self.lengths, default=0)
        if longest + 1 > self.capacity:
            self.reserve(self.batch_size, longest + 1 + CAPACITY_STEP)

    def positions(self, device: torch.device) -> torch.Tensor:
        """(batch, 1): where each row's next token goes."""
        return torch.tensor(self.lengths, dtype=torch.long, device=device).view(-1, 1)

    def advance(self) -> None:
        self.lengths = [n + 1 for n in self.lengths]

    def merge(self, other: StaticKV) -> None:
        """Append other's rows after ours (their keys copied into our free rows)."""
        n, k = self.batch_size, other.batch_size
        longest = max(other.lengths, default=0)
        self.reserve(n + k, max(longest, max(self.lengths, default=0)) + 1)
        for mine, theirs in ((self.keys, other.keys), (self.values, other.values)):
            for dst, src in zip(mine, theirs, strict=True):
                dst[n : n + k, :, :longest] = src[:k, :, :longest]
        self.lengths = self.lengths + list(other.lengths)

    def select(self, rows: list[int]) -> None:
        """Keep only these rows, in this order: row rows[j] becomes row j."""
        if rows == list(range(len(rows))):
            self.lengths = self.lengths[: len(rows)]
            return
        lengths = [self.lengths[r] for r in rows]
        if all(a < b for a, b in zip(rows, rows[1:], strict=False)):
            # increasing (the usual case: finished rows removed): every source lies at or
            # after its target, so moving rows down one by one never overwrites a source
            for j, r in enumerate(rows):
                if r == j:
                    continue
                used = self.lengths[r]
                for store in (self.keys, self.values):
                    for t in store:
                        t[j, :, :used] = t[r, :, :used]
        else:
            index = torch.tensor(rows, dtype=torch.long, device=self.keys[0].device)
            used = max(lengths, default=0)
            for store in (self.keys, self.values):
                for t in store:
                    t[: len(rows), :, :used] = t.index_select(0, index)[:, :, :used]
        self.lengths = lengths
