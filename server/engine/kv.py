"""A batch of sequences decoding together: one KV cache, left-padded, and its mask.

Rows join (merge), leave (select) and the cache is trimmed of columns no row needs, so
continuous batching never recomputes a prefix. Padded columns hold zeros and are masked
for every query, so they cannot leak into attention.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class KVBatch:
    def __init__(self, cache: DynamicCache, mask: torch.Tensor):
        self.cache = cache
        self.mask = mask  # (batch, kv_len) int64: 1 = a real token, 0 = padding

    @property
    def batch_size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def kv_len(self) -> int:
        return int(self.mask.shape[1])

    def positions(self) -> torch.Tensor:
        """(batch, 1): the position of the next token of every row."""
        return self.mask.sum(dim=1, keepdim=True)

    def _layers(self):
        return [layer for layer in self.cache.layers if layer.keys is not None]

    @classmethod
    def from_right_padded(
        cls,
        cache: DynamicCache,
        lengths: list[int],
        device: torch.device,
        starts: list[int] | None = None,
    ) -> KVBatch:
        """Turn a right-padded prefill cache into the left-padded layout decoding uses.

        Prefill runs right-padded because then no query row is fully masked (no NaNs);
        decoding wants every row's newest token in the same, last column. Row i holds
        columns [starts[i], lengths[i]) (starts: 0 unless a KV prefix sits left of some
        rows' prompts, see runner.py).
        """
        total = max(lengths)
        batch = len(lengths)
        lengths_t = torch.tensor(lengths, device=device)
        starts_t = torch.tensor(starts or [0] * batch, device=device).unsqueeze(1)
        cols = torch.arange(total, device=device)
        # For output column c of row i: source column c - (total - len_i), valid if >= start_i.
        shift = (total - lengths_t).unsqueeze(1)  # (batch, 1)
        src = cols.unsqueeze(0) - shift  # (batch, total)
        valid = src >= starts_t
        src = src.clamp(min=0)
        for layer in cache.layers:
            if layer.keys is None:
                continue
            for name in ("keys", "values"):
                t = getattr(layer, name)[:, :, :total]  # (batch, heads, seq, head_dim)
                idx = src.view(batch, 1, total, 1).expand(-1, t.shape[1], -1, t.shape[3])
                moved = torch.gather(t, 2, idx)
                moved = moved * valid.view(batch, 1, total, 1).to(moved.dtype)
                setattr(layer, name, moved.contiguous())
        mask = valid.to(torch.long)
        return cls(cache, mask)

    def merge(self, other: KVBatch) -> None:
        """Append other's rows; the shorter side gets zero columns on the left."""
        total = max(self.kv_len, other.kv_len)
        mine, theirs = self._layers(), other._layers()
        for a, b in zip(mine, theirs, strict=True):
            for name in ("keys", "values"):
                ta = _left_pad(getattr(a, name), total)
                tb = _left_pad(getattr(b, name), total)
                setattr(a, name, torch.cat([ta, tb], dim=0))
        self.mask = torch.cat(
            [_left_pad_mask(self.mask, total), _left_pad_mask(other.mask, total)], dim=0
        )

    def select(self, rows: list[int]) -> None:
        """Keep only these rows (in this order), then drop columns that are padding for all."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        for layer in self._layers():
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        self.mask = self.mask.index_select(0, index)
        self.trim()

    def trim(self) -> None:
        used = self.mask.any(dim=0).nonzero()
        if used.numel() == 0:
            return
        first = int(used[0])
        if first == 0:
            return
        for layer in self._layers():
            layer.keys = layer.keys[:, :, first:].contiguous()
            layer.values = layer.values[:, :, first:].contiguous()
        self.mask = self.mask[:, first:]

    def append_step(self) -> torch.Tensor:
        """The attention mask for one decode step: every row attends to its new token."""
        ones = torch.ones((self.batch_size, 1), dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        return self.mask


def _left_pad(t: torch.Tensor, total: int) -> torch.Tensor:
    missing = total - t.shape[2]
    if missing == 0:
        return t
    pad = torch.zeros((t.shape[0], t.shape[1], missing, t.shape[3]), dtype=t.dtype, device=t.device)
    return torch.cat([pad, t], dim=2)


def _left_pad_mask(mask: torch.Tensor, total: int) -> torch.Tensor:
    missing = total - mask.shape[1]
    if missing == 0:
        return mask
    pad = torch.zeros((mask.shape[0], missing), dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=1)
