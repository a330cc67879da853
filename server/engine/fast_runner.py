"""The fast path's runner: the same interface as ModelRunner (server/engine/runner.py), on a
lean forward (server/engine/decoder.py) and a preallocated cache (server/engine/static_kv.py).

The scheduler drives either runner the same way: ``new_group`` for newcomers,
``prefill_chunk`` until the group is finished, ``finish_prefill`` to get the group's
cache (it joins the running batch with ``merge``) and the logits of each prompt's last
token, then one ``decode`` per step over every running row. Rows carry their own
adapters as on the reference path: MultiAdapter plans the rows before each forward and
every adapter kind's wrapped layers apply inside the model's own modules. Virtual tokens
(prompt tuning) are placeholder ids at the front of a row's input, as on the reference
path; a KV prefix (prefix tuning) goes into the row's first cache columns, its prompt
right after it, so a row's cache column is its position, as in PEFT.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch

from server.engine.decoder import FastDecoder
from server.engine.multi_adapter import MultiAdapter, adapter_dtype, compute_dtype
from server.engine.runner import (
    ModelRunner,
    PrefillGroup,
    take_chunk_logits,
)
from server.engine.static_kv import StaticKV


class FastModelRunner:
    kind = "fast"
    # decode() takes a between-layers callback (the scheduler prefills newcomers there)
    preempts_decode = True

    def __init__(self, model: Any, pad_token_id: int):
        self.model = model
        self.pad_token_id = pad_token_id
        self.decoder = FastDecoder(model)
        self.dtype = compute_dtype(model)  # the KV cache's
        self.adapters = MultiAdapter(model, self.device, adapter_dtype(model, self.device))

    def interrupt_decode(self) -> None:
        """From any thread (a request came in): a decode step under way calls its
        between_layers after the layer it is in, also where its layers run as one call on
        the CPU kernel (FastDecoder.forward); a step that starts later, after its first."""
        self.decoder.pause.set()

    @property
    def device(self) -> torch.device:
        # the first tensor found, lazily: building the lists of every parameter and buffer
        # cost a few milliseconds, once per decode step
        for tensor in itertools.chain(self.model.parameters(), self.model.buffers()):
            return tensor.device
        return torch.device("cpu")

    def new_group(
        self,
        prompts: list[list[int]],
        adapters: list[str],
        prompt_logprobs: list[int | None] | None = None,
    ) -> PrefillGroup:
        # the same inputs as the reference path (virtual-token placeholders, prefixes)
        group = ModelRunner.new_group(self, prompts, adapters, prompt_logprobs)  # type: ignore[arg-type]
        # padded columns of a chunk are written too: room for the longest prefix + input
        longest = group.width + group.total
        group.cache = self.decoder.new_cache(len(prompts), longest, self.dtype, self.device)
        return group

    def _write_prefixes(self, group: PrefillGroup) -> None:
        """Each row's KV prefix (prefix tuning) into its first cache columns."""
        width = group.width
        layers = self.adapters.prefix_cache(group.adapters, width, self.dtype)
        cache: StaticKV = group.cache
        for layer, (keys, values) in enumerate(layers):  # (batch, kv heads, width, dim)
            for row, n in enumerate(group.prefix):
                if n:
                    cache.keys[layer][row, :, :n] = keys[row, :, width - n :]
                    cache.values[layer][row, :, :n] = values[row, :, width - n :]

    def _forward(
        self,
        adapters: list[str],
        input_start: int | None,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: StaticKV,
        keep: torch.Tensor | None = None,
        between_layers: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        self.adapters.set_rows(adapters, input_start)
        try:
            with torch.inference_mode():
                return self.decoder.forward(
                    input_ids, positions, cache, keep=keep, between_layers=between_layers
                )
        finally:
            self.adapters.clear_rows()

    def prefill_chunk(self, group: PrefillGroup, chunk_tokens: int) -> None:
        device = self.device
        if group.done == 0 and group.width:
            self._write_prefixes(group)
        start, end = group.done, group.chunk_end(chunk_tokens)
        rows = []
        for prompt in group.prompts:
            piece = prompt[start:end]
            rows.append(piece + [self.pad_token_id] * (end - start - len(piece)))
        input_ids = torch.tensor(rows, dtype=torch.long, device=device)  # (batch, chunk)
        # a row's positions (and cache columns) count its prefix, as PEFT's do
        prefix = torch.tensor(group.prefix or [0] * len(rows), device=device)
        positions = torch.arange(start, end, device=device).unsqueeze(0) + prefix.unsqueeze(1)
        # logits only where a row's last prompt token falls in this chunk
        wanted = {i: n - 1 - start for i, n in enumerate(group.lengths) if start <= n - 1 < end}
        keep = sorted(set(wanted.values())) or [end - start - 1]
        if group.wants_prompt_logprobs:
            keep = list(range(end - start))  # every column
        logits = self._forward(
            group.adapters,
            start,
            input_ids,
            positions,
            group.cache,
            keep=torch.tensor(keep, dtype=torch.long, device=device),
        )  # (batch, len(keep), vocab)
        take_chunk_logits(group, logits, wanted, keep, start, end)

    def finish_prefill(self, group: PrefillGroup) -> tuple[StaticKV, torch.Tensor]:
        cache: StaticKV = group.cache
        prefix = group.prefix or [0] * len(group.prompts)
        cache.lengths = [p + n for p, n in zip(prefix, group.lengths, strict=True)]
        logits = torch.stack([group.last_logits[i] for i in range(len(group.prompts))])
        return cache, logits  # logits: (batch, vocab)

    def decode(
        self,
        batch: StaticKV,
        tokens: list[int],
        adapters: list[str],
        between_layers: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """One decode step. ``between_layers`` runs after each layer and returns True when
        it ran a forward of its own (a newcomer's prefill, on its own cache): that forward
        planned the adapters for its rows, so this step's rows are planned again before
        the next layer. It runs outside inference mode, as it would between steps: the
        newcomer's cache outlives this step and is changed in place later (merge, select),
        which an inference tensor refuses outside inference mode."""
        device = self.device
        batch.ensure_step()
        positions = batch.positions(device)  # (batch, 1)
        input_ids = torch.tensor(tokens, dtype=torch.long, device=device).view(-1, 1)
        hook: Callable[[], None] | None = None
        if between_layers is not None:
            callback = between_layers

            def hook() -> None:
                with torch.inference_mode(False):
                    ran = callback()
                if ran:
                    self.adapters.set_rows(adapters, None)

        logits = self._forward(adapters, None, input_ids, positions, batch, between_layers=hook)
        batch.advance()
        return logits[:, -1, :].float()  # (batch, vocab)
