"""Per-row sampling: every row of a batch has its own temperature, top_p, seed, penalties."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from server.engine.base import SamplingParams

# Temperatures below this decode greedily (vLLM does the same): dividing logits by a
# temperature such as 1e-300 overflows to inf, and softmax of inf is NaN.
MIN_TEMPERATURE = 1e-5


@dataclass
class RowSampler:
    params: SamplingParams
    generator: torch.Generator | None = None
    counts: dict[int, int] = field(default_factory=dict)  # generated token -> times seen

    @classmethod
    def create(cls, params: SamplingParams, choice_index: int) -> RowSampler:
        generator = None
        if params.temperature >= MIN_TEMPERATURE and params.seed is not None:
            generator = torch.Generator(device="cpu")
            # distinct but reproducible streams for the n choices of one request
            generator.manual_seed(params.seed + choice_index)
        return cls(params=params, generator=generator)

    @property
    def greedy(self) -> bool:
        return self.params.temperature < MIN_TEMPERATURE

    def observe(self, token_id: int) -> None:
        self.counts[token_id] = self.counts.get(token_id, 0) + 1

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

    def sample(self, logits: torch.Tensor) -> int:
        """logits: (vocab,) float32 on CPU."""
        logits = self.apply_penalties(logits)
        if self.greedy:
            return int(torch.argmax(logits))
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
    """logits: (batch, vocab). Greedy rows without penalties take one batched argmax."""
    logits = logits.float().cpu()
    plain_greedy = [
        i
        for i, s in enumerate(samplers)
        if s.greedy and s.params.presence_penalty == 0 and s.params.frequency_penalty == 0
    ]
    out: list[int] = [0] * len(samplers)
    if plain_greedy:
        best = torch.argmax(logits[plain_greedy], dim=-1).tolist()
        for row, token in zip(plain_greedy, best, strict=True):
            out[row] = int(token)
    done = set(plain_greedy)
    for i, sampler in enumerate(samplers):
        if i not in done:
            out[i] = sampler.sample(logits[i])
    for i, sampler in enumerate(samplers):
        sampler.observe(out[i])
    return out
