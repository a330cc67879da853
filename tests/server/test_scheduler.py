"""Continuous batching on the tiny model: rows join and leave at every step and each row
decodes exactly as it would alone."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from server.engine.base import (
    GenerationRequest,
    QueueFullError,
    RequestTimeoutError,
    SamplingParams,
)
from server.engine.hf import HFEngine
from trainer.base_model import load_base_model

PROMPTS = [
    "Hello world, this is",
    "The quick brown fox jumps over the lazy dog. What is the capital of France?",
    "One base",
    "Adapters change behaviour; retrieval brings knowledge. Paris is",
]


@pytest.fixture(scope="module")
def loaded(tiny_model_path):
    return load_base_model(tiny_model_path, quantization="none", device="cpu")


def make_engine(loaded, **kwargs) -> HFEngine:
    engine = HFEngine(loaded, max_model_len=kwargs.pop("max_model_len", 256), **kwargs)
    asyncio.run(engine.start())
    return engine


@pytest.fixture(scope="module")
def engine(loaded):
    engine = make_engine(loaded, max_num_seqs=8, prefill_chunk_tokens=8)
    yield engine
    asyncio.run(engine.shutdown())


def request(engine, prompt, *, max_tokens=12, rid="r", **sampling) -> GenerationRequest:
    sampling.setdefault("temperature", 0.0)
    return GenerationRequest(
        request_id=rid,
        prompt_token_ids=engine.tokenize(prompt),
        sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sampling),
    )


async def run(engine, req, delay: float = 0.0):
    await asyncio.sleep(delay)
    tokens: dict[int, list[int]] = {}
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    async for out in engine.generate(req):
        tokens.setdefault(out.index, []).extend(out.token_ids)
        texts[out.index] = texts.get(out.index, "") + out.text
        if out.finish_reason:
            finish[out.index] = out.finish_reason
    return tokens, texts, finish


def alone(engine, prompt, **kw):
    return asyncio.run(run(engine, request(engine, prompt, **kw)))


def test_single_request_matches_plain_generate(engine, loaded):
    ids = engine.tokenize(PROMPTS[1])
    out = loaded.model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=12,
        min_new_tokens=12,
        do_sample=False,
    )
    tokens, _, finish = alone(engine, PROMPTS[1])
    assert tokens[0] == out[0][len(ids) :].tolist()
    assert finish[0] == "length"


def test_rows_in_a_batch_decode_as_they_would_alone(engine):
    budgets = [40 + 15 * i for i in range(len(PROMPTS))]
    solo = [alone(engine, p, max_tokens=budgets[i])[0][0] for i, p in enumerate(PROMPTS)]
    engine.scheduler.stats.peak_batch_size = 0

    async def together():
        # staggered arrivals: later rows join a batch that is already decoding, and
        # shorter rows leave it while the others go on
        jobs = [
            run(engine, request(engine, p, max_tokens=budgets[i], rid=str(i)), delay=0.01 * i)
            for i, p in enumerate(PROMPTS)
        ]
        return await asyncio.gather(*jobs)

    results = asyncio.run(together())
    for i, (tokens, _, _) in enumerate(results):
        assert tokens[0] == solo[i], f"row {i} diverged in the batch"
    assert engine.scheduler.stats.peak_batch_size >= 3


def test_chunked_prefill_matches_one_shot(loaded):
    one_shot = make_engine(loaded, prefill_chunk_tokens=512)
    chunked = make_engine(loaded, prefill_chunk_tokens=3)
    try:
        a = alone(one_shot, PROMPTS[3])[0]
        b = alone(chunked, PROMPTS[3])[0]
        assert a == b
    finally:
        asyncio.run(one_shot.shutdown())
        asyncio.run(chunked.shutdown())


def test_n_choices_are_seeded_and_reproducible(engine):
    first = alone(engine, PROMPTS[0], n=3, temperature=1.0, seed=7)[0]
    again = alone(engine, PROMPTS[0], n=3, temperature=1.0, seed=7)[0]
    other = alone(engine, PROMPTS[0], n=3, temperature=1.0, seed=8)[0]
    assert sorted(first) == [0, 1, 2]
    assert first == again
    assert first != other
    assert len({tuple(v) for v in first.values()}) > 1  # choices are not copies


def test_stop_string_ends_generation_and_is_not_returned(engine):
    _, texts, _ = alone(engine, PROMPTS[1], max_tokens=20)
    full = texts[0]
    assert len(full) > 6
    stop = full[3:6]
    cut = full.index(stop)
    _, texts, finish = alone(engine, PROMPTS[1], max_tokens=20, stop=[stop])
    assert finish[0] == "stop"
    assert texts[0] == full[:cut]


def test_top_p_and_penalties_change_sampling(engine):
    base = alone(engine, PROMPTS[2], max_tokens=16)[0][0]
    penalised = alone(
        engine, PROMPTS[2], max_tokens=16, frequency_penalty=2.0, presence_penalty=2.0
    )[0][0]
    assert base != penalised
    # penalties make repeats rarer
    assert len(set(penalised)) >= len(set(base))
    narrow = alone(engine, PROMPTS[2], max_tokens=8, temperature=1.0, top_p=1e-6, seed=1)[0][0]
    greedy = alone(engine, PROMPTS[2], max_tokens=8)[0][0]
    assert narrow == greedy  # top_p that keeps only the best token is greedy


def test_queue_full_is_refused(loaded):
    small = make_engine(loaded, max_num_seqs=1, max_queue=0)
    try:

        async def two():
            first = small.generate(request(small, PROMPTS[0], max_tokens=50))
            await first.__anext__()  # running now
            with pytest.raises(QueueFullError):
                await small.generate(request(small, PROMPTS[1])).__anext__()
            await first.aclose()

        asyncio.run(two())
    finally:
        asyncio.run(small.shutdown())


def test_timeout_ends_the_request(engine):
    req = request(engine, PROMPTS[0], max_tokens=200)
    req.timeout_s = 0.2
    with pytest.raises(RequestTimeoutError):
        asyncio.run(run(engine, req))


def test_closing_the_stream_frees_the_row(engine, monkeypatch):
    # the tiny model decodes 200 tokens faster than the client can hang up: slow each step
    real_decode = engine.runner.decode

    def slow_decode(*args, **kwargs):
        time.sleep(0.02)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "decode", slow_decode)
    before = engine.scheduler.stats.requests_cancelled
    generated_before = engine.scheduler.stats.tokens_generated

    async def partial():
        stream = engine.generate(request(engine, PROMPTS[0], max_tokens=200))
        await stream.__anext__()
        await stream.__anext__()
        await stream.aclose()

    asyncio.run(partial())
    stats = engine.scheduler.stats
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and stats.requests_cancelled == before:
        time.sleep(0.05)
    assert stats.requests_cancelled == before + 1
    time.sleep(0.1)  # one more loop turn publishes the batch size
    assert stats.running == 0
    assert engine.scheduler.stats.tokens_generated - generated_before < 100
