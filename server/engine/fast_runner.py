"""The fast path's runner: the same interface as ModelRunner (server/engine/runner.py), on a
lean forward (server/engine/decoder.py) and a preallocated cache (server/engine/static_kv.py).

The scheduler drives either runner the same way: ``new_group`` for newcomers,
``prefill_chunk`` until the group is finished, ``finish_prefill`` to get the group's
cache (it joins the running batch with ``merge``) and the logits of each prompt's last
token, then one ``decode`` per step over every running row. Rows carry their own
adapters as on the reference path: MultiLoRA plans the rows before each forward and its
layers (and the trained token rows) apply inside the model's own modules.
"""

from __future__ import annotations

from typing import Any

import torch

from server.engine.decoder import FastDecoder
from server.engine.lora import MultiLoRA, compute_dtype
from server.engine.runner import PrefillGroup
from server.engine.static_kv import StaticKV


class FastModelRunner:
    kind = "fast"

    def __init__(self, model: Any, pad_token_id: int):
        self.model = model
        self.pad_token_id = pad_token_id
        self.decoder = FastDecoder(model)
        self.dtype = compute_dtype(model)
        self.lora = MultiLoRA(model, self.device, self.dtype)

    @property
    def device(self) -> torch.device:
        for tensor in list(self.model.parameters()) + list(self.model.buffers()):
            return tensor.device
        return torch.device("cpu")

    def new_group(self, prompts: list[list[int]], adapters: list[str]) -> PrefillGroup:
        longest = max(len(p) for p in prompts)
        cache = self.decoder.new_cache(len(prompts), longest, self.dtype, self.device)
        return PrefillGroup(prompts=prompts, adapters=adapters, cache=cache)

    def _forward(
        self,
        adapters: list[str],
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: StaticKV,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.lora.set_rows(adapters)
        try:
            with torch.inference_mode():
                return self.decoder.forward(input_ids, positions, cache, keep=keep)
        finally:
            self.lora.clear_rows()

    def prefill_chunk(self, group: PrefillGroup, chunk_tokens: int) -> None:
        device = self.device
        start = group.done
        end = min(group.total, start + chunk_tokens)
        rows = []
        for prompt in group.prompts:
            piece = prompt[start:end]
            rows.append(piece + [self.pad_token_id] * (end - start - len(piece)))
        input_ids = torch.tensor(rows, dtype=torch.long, device=device)  # (batch, chunk)
        positions = torch.arange(start, end, device=device).expand(len(rows), -1)
        # logits only where a row's last prompt token falls in this chunk
        wanted = {i: n - 1 - start for i, n in enumerate(group.lengths) if start <= n - 1 < end}
        keep = sorted(set(wanted.values())) or [end - start - 1]
        logits = self._forward(
            group.adapters,
            input_ids,
            positions,
            group.cache,
            keep=torch.tensor(keep, dtype=torch.long, device=device),
        )  # (batch, len(keep), vocab)
        for row, col in wanted.items():
            group.last_logits[row] = logits[row, keep.index(col)].float()
        group.done = end

    def finish_prefill(self, group: PrefillGroup) -> tuple[StaticKV, torch.Tensor]:
        cache: StaticKV = group.cache
        cache.lengths = list(group.lengths)
        logits = torch.stack([group.last_logits[i] for i in range(len(group.prompts))])
        return cache, logits  # logits: (batch, vocab)

    def decode(self, batch: StaticKV, tokens: list[int], adapters: list[str]) -> torch.Tensor:
        device = self.device
        batch.ensure_step()
        positions = batch.positions(device)  # (batch, 1)
        input_ids = torch.tensor(tokens, dtype=torch.long, device=device).view(-1, 1)
        logits = self._forward(adapters, input_ids, positions, batch)
        batch.advance()
        return logits[:, -1, :].float()  # (batch, vocab)
