"""The bundled SmolLM2-135M-Instruct (a Llama), 4-bit, behind the real server: the README's
quickstart through the `openai` SDK, and adapters on it in a mixed batch."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from loadtests._adapters import linear_shapes_from_config, random_lora_adapter
from tests.integration.conftest import SMOLLM2
from trainer.base_model import resolve_base_model

pytestmark = pytest.mark.integration


def test_ready_reports_the_llama_in_4_bits(smollm2_server):
    ready = httpx.get(f"{smollm2_server.url}/ready").json()
    assert ready["model"] == "smollm2-135m-instruct"
    # loaded in NF4, re-packed at load for the CPU fast path (the default on a CPU)
    assert ready["runner"] == "fast"
    assert ready["quantization"] == "int4"
    assert ready["weights_format"]["linear"].startswith("int4")
    assert ready["weights_format"]["embedding"] == "float32"  # its own table: 21 % of it
    assert ready["num_parameters"] > 100_000_000
    assert ready["weights_bytes"] < 0.6 * ready["fp32_weights_bytes"]


def test_first_chat_gets_an_answer_that_ends(smollm2_server):
    """What a new user tries first: a question, then a short request, streamed and not.
    An instruction-tuned model answers and ends its turn (finish_reason "stop"), where the
    bundled Gemma base model repeats the question until max_tokens."""
    client = smollm2_server.openai()
    capital = client.chat.completions.create(
        model="base",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=48,
        temperature=0,
    )
    assert "Paris" in capital.choices[0].message.content
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    whole = client.chat.completions.create(
        model="base", messages=messages, max_tokens=64, temperature=0
    )
    assert whole.choices[0].finish_reason == "stop", whole.choices[0].message.content
    assert "sea" in whole.choices[0].message.content.lower()
    assert "<|im_end|>" not in whole.choices[0].message.content
    stream = client.chat.completions.create(
        model="base",
        messages=messages,
        max_tokens=64,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_adapters_on_the_llama_batch_with_the_base(smollm2_server, tmp_path):
    url = smollm2_server.url
    config = json.loads((resolve_base_model(SMOLLM2) / "config.json").read_text())
    shapes = linear_shapes_from_config(config)
    # named as PEFT names an adapter trained on the hub's copy of this model
    hub_name = "HuggingFaceTB/SmolLM2-135M-Instruct"
    for seed, name in enumerate(("tone-a", "tone-b")):
        path = random_lora_adapter(
            tmp_path / name, shapes, r=8, seed=seed, scale=0.05, base_name=hub_name
        )
        r = httpx.post(f"{url}/adapters", json={"name": name, "path": str(path)}, timeout=300)
        assert r.status_code == 201, r.text
        assert len(r.json()["target_modules"]) == 30 * 7  # every linear layer of 30 blocks
    # a Gemma-shaped adapter does not fit this base: refused, nothing registered
    gemma_shapes = {k: (640, v[1]) for k, v in shapes.items()}
    wrong = random_lora_adapter(tmp_path / "wrong", gemma_shapes, base_name="gemma-3-270m")
    r = httpx.post(f"{url}/adapters", json={"name": "wrong", "path": str(wrong)}, timeout=60)
    assert r.status_code == 400, r.text
    assert "wrong" not in [m.id for m in smollm2_server.openai().models.list().data]

    order = ["base", "tone-a", "tone-b"]
    prompt = "The capital of France is"

    def complete(model: str) -> str:
        r = smollm2_server.openai().completions.create(
            model=model, prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
        )
        return r.choices[0].text

    alone = {m: complete(m) for m in order}
    assert len(set(alone.values())) == 3, alone  # the model field alone changes behaviour

    async def together() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)
        jobs = [
            client.completions.create(
                model=m, prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
            )
            for m in order
        ]
        return [r.choices[0].text for r in await asyncio.gather(*jobs)]

    mixed = asyncio.run(together())
    # As on Gemma (test_bundled_adapters): a batched 4-bit matmul may round differently
    # from a single row's, so rows are held to their own adapter's start, not to equality
    # (the tiny float32 Llama in tests/server/test_lora.py proves exact equality).
    for i, model in enumerate(order):
        shared = {m: common_prefix(mixed[i], alone[m]) for m in order}
        assert shared[model] >= 4, (model, mixed[i], alone[model])
        assert shared[model] == max(shared.values()), (model, shared)


def common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
