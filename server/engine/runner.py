"""Forward passes for the scheduler: chunked prefill of newcomers, one decode step for all.

Every forward names one adapter per row (BASE_ADAPTER for none); the model's LoRA layers
(server/engine/lora.py) apply each row's own adapter, so rows of one batch can each use a
different LoRA adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from server.engine.base import BASE_ADAPTER
from server.engine.kv import KVBatch
from server.engine.lora import MultiLoRA, compute_dtype


@dataclass
class PrefillGroup:
    """Newcomers prefilled together, right-padded, possibly over several chunks."""

    prompts: list[list[int]]
    adapters: list[str]
    done: int = 0  # columns already run
    # the group's own cache while it prefills: a DynamicCache here, a StaticKV on the
    # fast path (server/engine/fast_runner.py)
    cache: Any = field(default_factory=DynamicCache)
    last_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # row -> (vocab,)

    @property
    def lengths(self) -> list[int]:
        return [len(p) for p in self.prompts]

    @property
    def total(self) -> int:
        return max(self.lengths)

    @property
    def finished(self) -> bool:
        return self.done >= self.total


class ModelRunner:
    """The reference path: the model's own forward over a growing cache."""

    kind = "reference"

    def __init__(self, model: Any, pad_token_id: int):
        self.model = model  # a transformers model; LoRA layers are wrapped into it
        self.pad_token_id = pad_token_id
        self.lora = MultiLoRA(model, self.device, compute_dtype(model))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def new_group(self, prompts: list[list[int]], adapters: list[str]) -> PrefillGroup:
        return PrefillGroup(prompts=prompts, adapters=adapters)

    def _forward(self, adapters: list[str], **kwargs: Any) -> torch.Tensor:
        self.lora.set_rows(adapters)
        try:
            with torch.inference_mode():
                out = self.model(use_cache=True, **kwargs)
        finally:
            self.lora.clear_rows()
        return out.logits

    @torch.inference_mode()
    def prefill_chunk(self, group: PrefillGroup, chunk_tokens: int) -> None:
        device = self.device
        lengths = torch.tensor(group.lengths, device=device)
        start = group.done
        end = min(group.total, start + chunk_tokens)
        rows = []
        for prompt in group.prompts:
            piece = prompt[start:end]
            rows.append(piece + [self.pad_token_id] * (end - start - len(piece)))
        input_ids = torch.tensor(rows, dtype=torch.long, device=device)  # (batch, chunk)
        cols = torch.arange(end, device=device)
        attention_mask = (cols.unsqueeze(0) < lengths.unsqueeze(1)).long()  # (batch, end)
        positions = torch.arange(start, end, device=device).unsqueeze(0)
        positions = positions.expand(len(rows), -1)
        # logits only where a row's last prompt token falls in this chunk
        wanted = {i: n - 1 - start for i, n in enumerate(group.lengths) if start <= n - 1 < end}
        keep = sorted(set(wanted.values()))
        # a chunk that ends no row's prompt still fills the cache; keep one column, unused
        to_keep = torch.tensor(keep, dtype=torch.long, device=device) if keep else 1
        logits = self._forward(
            group.adapters,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            past_key_values=group.cache,
            cache_position=torch.arange(start, end, device=device),
            logits_to_keep=to_keep,
        )  # (batch, len(keep) or 1, vocab)
        for row, col in wanted.items():
            group.last_logits[row] = logits[row, keep.index(col)].float()
        group.done = end

    def finish_prefill(self, group: PrefillGroup) -> tuple[KVBatch, torch.Tensor]:
        batch = KVBatch.from_right_padded(group.cache, group.lengths, self.device)
        logits = torch.stack([group.last_logits[i] for i in range(len(group.prompts))])
        return batch, logits  # logits: (batch, vocab)

    @torch.inference_mode()
    def decode(self, batch: KVBatch, tokens: list[int], adapters: list[str]) -> torch.Tensor:
        device = self.device
        past_len = batch.kv_len
        positions = batch.positions()  # (batch, 1)
        mask = batch.append_step()  # (batch, past_len + 1)
        logits = self._forward(
            adapters,
            input_ids=torch.tensor(tokens, dtype=torch.long, device=device).view(-1, 1),
            attention_mask=mask,
            position_ids=positions,
            past_key_values=batch.cache,
            cache_position=torch.tensor([past_len], device=device),
            logits_to_keep=1,
        )
        return logits[:, -1, :].float()  # (batch, vocab)


def adapter_row_name(adapter: str | None) -> str:
    return adapter or BASE_ADAPTER
