"""CUDA paths: NF4 on the GPU and the scheduler on the GPU. Skipped where there is no GPU."""

from __future__ import annotations

import asyncio

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_nf4_on_cuda_and_batched_decoding_match_alone(tiny_model_path):
    import bitsandbytes as bnb

    from server.engine.base import GenerationRequest, SamplingParams
    from server.engine.hf import HFEngine
    from trainer.base_model import load_base_model

    loaded = load_base_model(tiny_model_path, quantization="nf4", device="cuda")
    assert loaded.device == "cuda"
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.model.modules())
    assert next(loaded.model.parameters()).is_cuda
    engine = HFEngine(loaded, max_model_len=256)
    asyncio.run(engine.start())

    def req(prompt):
        return GenerationRequest(
            "g",
            engine.tokenize(prompt),
            SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
        )

    async def collect(r):
        return [t async for out in engine.generate(r) for t in out.token_ids]

    try:
        prompts = ["Hello world, this is", "One base", "The quick brown fox"]
        alone = [asyncio.run(collect(req(p))) for p in prompts]

        async def together():
            return await asyncio.gather(*(collect(req(p)) for p in prompts))

        assert asyncio.run(together()) == alone
    finally:
        asyncio.run(engine.shutdown())
