"""Adapters on the bundled model: registered at run time, chosen by `model` alone, batched
together with the base, refused when they do not fit."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from loadtests._adapters import linear_shapes_from_config, random_lora_adapter
from tests.integration.conftest import GEMMA
from trainer.base_model import resolve_base_model

pytestmark = pytest.mark.integration

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def bundled_adapters(tmp_path_factory):
    config = json.loads((resolve_base_model(GEMMA) / "config.json").read_text())
    shapes = linear_shapes_from_config(config)
    root = tmp_path_factory.mktemp("bundled-adapters")
    return {
        name: random_lora_adapter(root / name, shapes, r=16, seed=seed, scale=0.05)
        for seed, name in enumerate(("style-a", "style-b"))
    } | {"too-big": random_lora_adapter(root / "too-big", shapes, r=128, seed=5)}


def common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def complete(server, model, max_tokens=8):
    r = server.openai().completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    return r.choices[0].text


def test_register_switch_by_model_and_batch(bundled_server, bundled_adapters):
    url = bundled_server.url
    for name in ("style-a", "style-b"):
        r = httpx.post(
            f"{url}/adapters", json={"name": name, "path": str(bundled_adapters[name])}, timeout=300
        )
        assert r.status_code == 201, r.text
        assert r.json()["rank"] == 16 and len(r.json()["target_modules"]) == 18 * 7
    ids = [m.id for m in bundled_server.openai().models.list().data]
    assert {"base", "style-a", "style-b"} <= set(ids)
    alone = {m: complete(bundled_server, m) for m in ("base", "style-a", "style-b")}
    assert len(set(alone.values())) == 3, alone  # the model field alone changes behaviour

    async def together():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)
        jobs = [
            client.completions.create(
                model=m, prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
            )
            for m in ("base", "style-a", "style-b")
        ]
        return [r.choices[0].text for r in await asyncio.gather(*jobs)]

    mixed = asyncio.run(together())
    # One forward over three rows, each with its own adapter. In bfloat16 a matmul over
    # three rows may round differently from one over a single row, so after a few tokens
    # greedy decoding can take another near-tied branch (the tiny float32 model in
    # tests/server proves exact equality). Each row must still follow its own adapter.
    order = ["base", "style-a", "style-b"]
    for i, model in enumerate(order):
        shared = {m: common_prefix(mixed[i], alone[m]) for m in order}
        assert shared[model] >= 4, (model, mixed[i], alone[model])
        assert shared[model] == max(shared.values()), (model, shared)


def test_refusals_on_the_bundled_model(bundled_server, bundled_adapters):
    url = bundled_server.url
    before = httpx.get(f"{url}/adapters").json()
    r = httpx.post(
        f"{url}/adapters", json={"name": "too-big", "path": str(bundled_adapters["too-big"])}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "rank_too_high"
    with pytest.raises(openai.NotFoundError):
        complete(bundled_server, "never-registered")
    assert httpx.get(f"{url}/adapters").json() == before
