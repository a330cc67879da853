"""Per-row sampling: every row of a batch has its own temperature, top_p, seed, penalties,
logit_bias, grammar (constrained decoding) and log-probability request.

The order, per row: logit_bias, then presence/frequency penalties, then the grammar's
mask (tokens the grammar forbids get -inf); log probabilities are read there (a
log-softmax of those logits); then temperature and top_p pick the token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from server.engine.base import SamplingParams
from server.engine.grammar import RowGrammar, apply_bitmask, new_bitmask
from server.engine.topk import argmax_rows

# Temperatures below this decode greedily (vLLM does the same): dividing logits by a
# temperature such as 1e-300 overflows to inf, and softmax of inf is NaN.
MIN_TEMPERATURE = 1e-5

# (token id, logprob, [(alternative id, logprob), ...] most likely first)
RawLogprobs = tuple[int, float | None, list[tuple[int, float]]]


@dataclass
class RowSampler:
    params: SamplingParams
    generator: torch.Generator | None = None
    counts: dict[int, int] = field(default_factory=dict)  # generated token -> times seen
    grammar: RowGrammar | None = None
    # logprobs of the token this row sampled last (with params.logprobs)
    last_logprobs: RawLogprobs | None = None
    _bias: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def create(
        cls, params: SamplingParams, choice_index: int, grammar: RowGrammar | None = None
    ) -> RowSampler:
        generator = None
        if params.temperature >= MIN_TEMPERATURE and params.seed is not None:
            generator = torch.Generator(device="cpu")
            # distinct but reproducible streams for the n choices of one request
            generator.manual_seed(params.seed + choice_index)
        bias = None
        if params.logit_bias:
            ids = torch.tensor(list(params.logit_bias.keys()), dtype=torch.long)
            values = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32)
            bias = (ids, values)
        return cls(params=params, generator=generator, grammar=grammar, _bias=bias)

    @property
    def greedy(self) -> bool:
        return self.params.temperature < MIN_TEMPERATURE

    @property
    def plain(self) -> bool:
        """Nothing but the logits decides: greedy rows like this share one batched argmax."""
        p = self.params
        return (
            self.greedy
            and p.presence_penalty == 0
            and p.frequency_penalty == 0
            and self._bias is None
            and self.grammar is None
            and p.logprobs is None
        )

    def observe(self, token_id: int) -> None:
        self.counts[token_id] = self.counts.get(token_id, 0) + 1
        if self.grammar is not None:
            self.grammar.accept(token_id)

    def apply_penalties(self, logits: torch.Tensor) -> torch.Tensor:
        # OpenAI's definition: logit -= count * frequency_penalty + (count > 0) * presence_penalty
        p = self.params
        if not self.counts or (p.presence_penalty == 0 and p.frequency_penalty == 0):
            return logits
        ids = torch.tensor(list(self.counts.keys()), dtype=torch.long)
        counts = torch.tensor(list(self.counts.values()), dtype=logits.dtype)
        logits = logits.clone()
        logits[ids] -= counts * p.frequency_penalty + p.presence_penalty
        return logits

    def process(self, logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """logit_bias, penalties and the grammar mask (a row of bits), on a copy."""
        if self._bias is not None:
            ids, values = self._bias
            logits = logits.clone()
            logits[ids] += values
        logits = self.apply_penalties(logits)
        if mask is not None:
            logits = logits.clone()
            apply_bitmask(logits, mask)
        return logits

    def record_logprobs(self, logits: torch.Tensor, token: int) -> None:
        k = self.params.logprobs
        if k is None:
            return
        lp = torch.log_softmax(logits, dim=-1)
        top: list[tuple[int, float]] = []
        if k > 0:
            values, ids = torch.topk(lp, k)
            # tokens the grammar forbids (-inf) are no alternatives
            top = [
                (int(i), float(v))
                for i, v in zip(ids.tolist(), values.tolist(), strict=True)
                if v != float("-inf")
            ]
        self.last_logprobs = (token, float(lp[token]), top)

    def sample(self, logits: torch.Tensor) -> int:
        """logits: (vocab,) float32 on CPU; logit_bias and penalties applied here."""
        return self._pick(self.process(logits))

    def _pick(self, logits: torch.Tensor) -> int:
        if self.greedy:
            return int(argmax_rows(logits.reshape(1, -1)))
        logits = logits / self.params.temperature
        probs = torch.softmax(logits, dim=-1)
        if not bool(torch.isfinite(probs).all()):
            # logits that were already inf/NaN: one bad row must not fail the whole batch
            return int(torch.argmax(torch.nan_to_num(logits, nan=float("-inf"))))
        top_p = self.params.top_p
        if top_p < 1.0:
            sorted_probs, sorted_ids = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            keep = cumulative - sorted_probs < top_p
            # the top token always stays: a top_p such as 1e-300 is 0 in float32
            keep[0] = True
            sorted_probs = sorted_probs * keep
            choice = torch.multinomial(sorted_probs, 1, generator=self.generator)
            return int(sorted_ids[choice])
        return int(torch.multinomial(probs, 1, generator=self.generator))


def sample_rows(logits: torch.Tensor, samplers: list[RowSampler]) -> list[int]:
    """logits: (batch, vocab). Greedy rows without processing take one batched argmax."""
    logits = logits.float().cpu()
    plain = [i for i, s in enumerate(samplers) if s.plain]
    out: list[int] = [0] * len(samplers)
    if plain:
        # every row plain (the usual case): no copy of the rows
        rows = logits if len(plain) == len(samplers) else logits[plain]
        best = argmax_rows(rows.contiguous()).tolist()
        for row, token in zip(plain, best, strict=True):
            out[row] = int(token)
    done = set(plain)
    constrained = [i for i, s in enumerate(samplers) if s.grammar is not None]
    masks = None
    if constrained:
        masks = new_bitmask(len(samplers), logits.shape[-1])
        for i in constrained:
            grammar = samplers[i].grammar
            assert grammar is not None
            grammar.fill_mask(masks, i)
    for i, sampler in enumerate(samplers):
        if i in done:
            continue
        mask = masks[i] if masks is not None and sampler.grammar is not None else None
        row = sampler.process(logits[i], mask)
        out[i] = sampler._pick(row)
        sampler.record_logprobs(row, out[i])
    for i, sampler in enumerate(samplers):
        sampler.observe(out[i])
    return out
