"""CUDA paths: NF4 on the GPU and the scheduler on the GPU. Skipped where there is no GPU."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tests.support import greedy_alone_and_batched

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_nf4_on_cuda_and_batched_decoding_match_alone(tiny_model_path):
    import bitsandbytes as bnb

    from server.engine.hf import HFEngine
    from trainer.base_model import load_base_model

    loaded = load_base_model(tiny_model_path, quantization="nf4", device="cuda")
    assert loaded.device == "cuda"
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.model.modules())
    assert next(loaded.model.parameters()).is_cuda
    engine = HFEngine(loaded, max_model_len=256)
    asyncio.run(engine.start())
    try:
        prompts = ["Hello world, this is", "One base", "The quick brown fox"]
        alone, together = greedy_alone_and_batched(engine, prompts, max_tokens=12)
        assert together == alone
    finally:
        asyncio.run(engine.shutdown())


def test_packed_lora_on_cuda_matches_peft_on_cpu(tiny_model_path, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from server.engine.base import BASE_ADAPTER
    from server.engine.kinds.lora import read_peft_lora
    from server.engine.multi_adapter import MultiAdapter
    from tests.tiny_model import build_lora_adapter

    paths = {
        f"g{i}": build_lora_adapter(tiny_model_path, tmp_path / f"g{i}", seed=i) for i in (1, 2)
    }
    ids = torch.randint(5, 60, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = {BASE_ADAPTER: AutoModelForCausalLM.from_pretrained(tiny_model_path)(ids).logits[0]}
        for name, path in paths.items():
            base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
            ref[name] = PeftModel.from_pretrained(base, str(path)).eval()(ids).logits[0]
        model = AutoModelForCausalLM.from_pretrained(tiny_model_path).to("cuda").eval()
        lora = MultiAdapter(model, torch.device("cuda"), torch.float32)
        for name, path in paths.items():
            lora.add(read_peft_lora(name, path))
        rows = ["g1", BASE_ADAPTER, "g2"]
        lora.set_rows(rows)
        logits = model(ids.to("cuda").expand(len(rows), -1)).logits.cpu()
        lora.clear_rows()
    for row, name in zip(logits, rows, strict=True):
        torch.testing.assert_close(row, ref[name], atol=1e-3, rtol=1e-3)


def test_server_on_cuda_serves_mixed_adapters_to_the_openai_client(tiny_model_path, tmp_path):
    """The real server on the GPU (NF4 base), adapters registered over HTTP, the official
    client: each prompt's greedy completion is the same alone and in a concurrent batch
    that mixes the base and two adapters, and the adapters change what is said."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from tests.support import start_live_server
    from tests.tiny_model import build_lora_adapter

    server = start_live_server(
        base_model=str(tiny_model_path),
        quantization="nf4",
        device="cuda",
        max_model_len=256,
        default_max_tokens=16,
        data_dir=tmp_path / "data",
    )
    try:
        for i in (1, 2):
            path = build_lora_adapter(tiny_model_path, tmp_path / f"g{i}", seed=i, r=8)
            r = httpx.post(f"{server.url}/adapters", json={"name": f"g{i}", "path": str(path)})
            assert r.status_code in (200, 201), r.text
        ready = httpx.get(f"{server.url}/ready").json()
        assert ready["device"].startswith("cuda") and ready["quantization"] == "nf4", ready
        client = server.openai()
        jobs = [
            (m, p)
            for p in ("Hello world, this is", "The quick brown fox")
            for m in ("base", "g1", "g2")
        ]

        def complete(job: tuple[str, str]) -> str:
            model, prompt = job
            out = client.completions.create(
                model=model,
                prompt=prompt,
                max_tokens=12,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            return out.choices[0].text

        alone = [complete(job) for job in jobs]
        with ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(complete, jobs))
        assert together == alone
        assert len({alone[0], alone[1], alone[2]}) == 3  # base, g1, g2 differ
    finally:
        server.stop()
