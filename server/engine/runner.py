"""Forward passes for the scheduler: chunked prefill of newcomers, one decode step for all.

Every forward names one adapter per row (BASE_ADAPTER for none); the adapter kinds'
wrapped layers (server/engine/multi_adapter.py) apply each row's own adapter, so rows of
one batch can each use a different adapter of any kind.

A row whose adapter puts something in front of its prompt gets it here, at the start of
its prefill: virtual tokens (prompt tuning, p-tuning) as placeholder ids at the front of
its input, whose rows the wrapped embedding replaces; a KV prefix (prefix tuning) written
into its cache columns just left of its prompt. A group's prompts start in the same
column (``width``, the longest prefix), each row's prefix right-aligned before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from server.engine.base import BASE_ADAPTER
from server.engine.kv import KVBatch
from server.engine.multi_adapter import MultiAdapter, adapter_dtype


@dataclass
class PrefillGroup:
    """Newcomers prefilled together, right-padded, possibly over several chunks."""

    prompts: list[list[int]]  # each row's input: virtual-token placeholders, then its prompt
    adapters: list[str]
    # per row: how many alternatives to keep with the prompt's own token logprobs
    # (completions' echo), None for a row that wants none
    prompt_logprobs: list[int | None] = field(default_factory=list)
    # each row's KV prefix (prefix tuning): cache columns left of its input
    prefix: list[int] = field(default_factory=list)
    done: int = 0  # input columns already run
    # the group's own cache while it prefills: a DynamicCache here, a StaticKV on the
    # fast path (server/engine/fast_runner.py)
    cache: Any = field(default_factory=DynamicCache)
    last_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # row -> (vocab,)
    # row -> (token, logprob, top) for prompt tokens 1.. (token 0 has nothing before it)
    prompt_lps: dict[int, list[tuple[int, float, list[tuple[int, float]]]]] = field(
        default_factory=dict
    )

    @property
    def wants_prompt_logprobs(self) -> bool:
        return any(k is not None for k in self.prompt_logprobs)

    @property
    def lengths(self) -> list[int]:
        return [len(p) for p in self.prompts]

    @property
    def total(self) -> int:
        return max(self.lengths)

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    @property
    def width(self) -> int:
        """Cache columns before the first input column: room for the longest prefix."""
        return max(self.prefix, default=0)

    def chunk_end(self, chunk_tokens: int) -> int:
        """Where the next chunk of at most ``chunk_tokens`` columns ends. With prompt
        logprobs a chunk keeps logits for every position: fewer columns then."""
        if self.wants_prompt_logprobs:
            chunk_tokens = max(1, min(chunk_tokens, PROMPT_LOGPROB_POSITIONS // len(self.prompts)))
        return min(self.total, self.done + chunk_tokens)


# With prompt logprobs a chunk keeps logits for every position of every row: at most this
# many (rows x columns), about 1 MB each for a 262k-token vocabulary.
PROMPT_LOGPROB_POSITIONS = 128


class ModelRunner:
    """The reference path: the model's own forward over a growing cache."""

    kind = "reference"
    # decode() is the model's own forward, with no place between layers for other work
    preempts_decode = False

    def __init__(self, model: Any, pad_token_id: int):
        self.model = model  # a transformers model; LoRA layers are wrapped into it
        self.pad_token_id = pad_token_id
        self.adapters = MultiAdapter(model, self.device, adapter_dtype(model, self.device))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def new_group(
        self,
        prompts: list[list[int]],
        adapters: list[str],
        prompt_logprobs: list[int | None] | None = None,
    ) -> PrefillGroup:
        """A prefill group; rows whose adapter adds virtual tokens get placeholders for them."""
        inputs = []
        for prompt, adapter in zip(prompts, adapters, strict=True):
            virtual = self.adapters.virtual_tokens(adapter)
            inputs.append([self.pad_token_id] * virtual + list(prompt) if virtual else prompt)
        prefix = [self.adapters.prefix_tokens(a) for a in adapters]
        return PrefillGroup(
            prompts=inputs,
            adapters=adapters,
            prefix=prefix,
            prompt_logprobs=prompt_logprobs or [None] * len(prompts),
        )

    def _forward(self, adapters: list[str], input_start: int | None, **kwargs: Any) -> torch.Tensor:
        self.adapters.set_rows(adapters, input_start)
        try:
            with torch.inference_mode():
                out = self.model(use_cache=True, **kwargs)
        finally:
            self.adapters.clear_rows()
        return out.logits

    def _write_prefixes(self, group: PrefillGroup) -> None:
        """Fill the cache columns left of the inputs: each row's KV prefix, right-aligned."""
        dtype = self.model.get_input_embeddings().weight.dtype  # the dtype keys are cached in
        layers = self.adapters.prefix_cache(group.adapters, group.width, dtype)
        for layer, (keys, values) in enumerate(layers):
            group.cache.update(keys, values, layer)

    @torch.inference_mode()
    def prefill_chunk(self, group: PrefillGroup, chunk_tokens: int) -> None:
        device = self.device
        width = group.width
        if group.done == 0 and width:
            self._write_prefixes(group)
        lengths = torch.tensor(group.lengths, device=device)
        prefix = torch.tensor(group.prefix or [0] * len(group.prompts), device=device)
        start, end = group.done, group.chunk_end(chunk_tokens)
        rows = []
        for prompt in group.prompts:
            piece = prompt[start:end]
            rows.append(piece + [self.pad_token_id] * (end - start - len(piece)))
        input_ids = torch.tensor(rows, dtype=torch.long, device=device)  # (batch, chunk)
        # cache columns: [width - prefix_i, width) the row's prefix, then its input from width
        cols = torch.arange(width + end, device=device).unsqueeze(0)
        first = (width - prefix).unsqueeze(1)
        attention_mask = ((cols >= first) & (cols < width + lengths.unsqueeze(1))).long()
        # a row's positions count its prefix, as PEFT's do (the prompt starts at n)
        positions = torch.arange(start, end, device=device).unsqueeze(0) + prefix.unsqueeze(1)
        # logits only where a row's last prompt token falls in this chunk
        wanted = {i: n - 1 - start for i, n in enumerate(group.lengths) if start <= n - 1 < end}
        keep = sorted(set(wanted.values()))
        # a chunk that ends no row's prompt still fills the cache; keep one column, unused
        to_keep: torch.Tensor | int = (
            torch.tensor(keep, dtype=torch.long, device=device) if keep else 1
        )
        if group.wants_prompt_logprobs:
            keep = list(range(end - start))
            to_keep = 0  # every column
        logits = self._forward(
            group.adapters,
            start,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            past_key_values=group.cache,
            cache_position=torch.arange(width + start, width + end, device=device),
            logits_to_keep=to_keep,
        )  # (batch, len(keep) or 1, vocab)
        take_chunk_logits(group, logits, wanted, keep, start, end)

    def finish_prefill(self, group: PrefillGroup) -> tuple[KVBatch, torch.Tensor]:
        width = group.width
        ends = [width + n for n in group.lengths]
        starts = [width - p for p in group.prefix] if width else None
        batch = KVBatch.from_right_padded(group.cache, ends, self.device, starts=starts)
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
            None,
            input_ids=torch.tensor(tokens, dtype=torch.long, device=device).view(-1, 1),
            attention_mask=mask,
            position_ids=positions,
            past_key_values=batch.cache,
            cache_position=torch.tensor([past_len], device=device),
            logits_to_keep=1,
        )
        return logits[:, -1, :].float()  # (batch, vocab)


def take_chunk_logits(
    group: PrefillGroup,
    logits: torch.Tensor,
    wanted: dict[int, int],
    keep: list[int],
    start: int,
    end: int,
) -> None:
    """After a prefill chunk's forward (``logits``: batch x len(keep) x vocab): each row whose
    prompt ends in the chunk keeps its last logits, rows asking for prompt logprobs get the
    chunk's, and the group moves on to ``end``. Shared by both runners."""
    for row, col in wanted.items():
        group.last_logits[row] = logits[row, keep.index(col)].float()
    for row, k in enumerate(group.prompt_logprobs):
        if k is not None:
            prompt = group.prompts[row]
            # column c predicts prompt token start + c + 1
            out = group.prompt_lps.setdefault(row, [])
            for c in range(0, min(end, len(prompt) - 1) - start):
                out.append(_logprobs_at(logits[row, c].float(), prompt[start + c + 1], k))
    group.done = end


def _logprobs_at(
    logits: torch.Tensor, token: int, k: int
) -> tuple[int, float, list[tuple[int, float]]]:
    lp = torch.log_softmax(logits, dim=-1)  # (vocab,)
    top: list[tuple[int, float]] = []
    if k > 0:
        values, ids = torch.topk(lp, k)
        top = [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    return token, float(lp[token]), top


def adapter_row_name(adapter: str | None) -> str:
    return adapter or BASE_ADAPTER
