"""One adapter of every kind on the bundled Gemma 3 270M, built by PEFT: in float32 the
engine's rows equal PEFT's forward on the real architecture (head_dim 256, one KV head,
scaled embeddings); in NF4 each serves by `model` in one mixed batch through the `openai`
client; the base name is judged by what the tensors prove (Google's and Unsloth's names for
this model match, a local folder is reported, the instruction-tuned sibling is refused)."""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import openai
import pytest

from tests.integration.conftest import GEMMA
from tests.tiny_model import build_lora_adapter, build_peft_adapter
from trainer.base_model import resolve_base_model

pytestmark = pytest.mark.integration

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def kind_adapters(tmp_path_factory):
    from peft import (
        IA3Config,
        LNTuningConfig,
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptTuningConfig,
        TaskType,
    )

    base = resolve_base_model(GEMMA)
    root = tmp_path_factory.mktemp("bundled-kinds")
    lm = TaskType.CAUSAL_LM
    configs = {
        "k-ia3": (IA3Config(task_type=lm), 0.3),
        "k-prompt": (PromptTuningConfig(task_type=lm, num_virtual_tokens=8), 0.05),
        "k-ptuning": (
            PromptEncoderConfig(task_type=lm, num_virtual_tokens=6, encoder_hidden_size=64),
            0.3,
        ),
        "k-prefix": (PrefixTuningConfig(task_type=lm, num_virtual_tokens=8), 0.5),
        "k-ln": (LNTuningConfig(task_type=lm), 0.5),
    }
    made = {
        name: build_peft_adapter(base, root / name, config, seed=i + 1, scale=scale)
        for i, (name, (config, scale)) in enumerate(configs.items())
    }
    made["k-lora"] = build_lora_adapter(
        base, root / "k-lora", r=8, seed=9, target_modules=["q_proj", "v_proj"]
    )
    return made


def test_every_kind_matches_peft_in_float32(kind_adapters):
    """The engine's rows (chunked prefill, then decode steps on the cache, every kind in one
    batch with a base row) against PEFT's forward over the whole sequence, adapter by
    adapter (one PEFT model in memory at a time)."""
    import torch
    from peft import PeftModel

    from server.engine.base import BASE_ADAPTER
    from server.engine.runner import ModelRunner
    from tests.support import load_causal_lm, read_adapter

    base = resolve_base_model(GEMMA)
    runner = ModelRunner(load_causal_lm(base), pad_token_id=0)
    for name, path in kind_adapters.items():
        runner.adapters.add(read_adapter(name, path))
    rows = [*kind_adapters, BASE_ADAPTER]
    prompts = [[2, 818, 5279, 529, 7001, 563], [2, 9259, 1902], [2, 818, 5279, 529]]
    prompts = [prompts[i % 3] for i in range(len(rows))]
    group = runner.new_group(prompts, rows)
    while not group.finished:
        runner.prefill_chunk(group, 4)
    batch, logits = runner.finish_prefill(group)
    steps, generated = [], [[] for _ in rows]
    for _ in range(3):
        steps.append(logits)
        tokens = logits.argmax(-1).tolist()
        for i, t in enumerate(tokens):
            generated[i].append(t)
        logits = runner.decode(batch, tokens, rows)
    del runner, batch
    for i, name in enumerate(rows):
        model = load_causal_lm(base)
        if name != BASE_ADAPTER:
            model = PeftModel.from_pretrained(model, str(kind_adapters[name])).eval()
        with torch.inference_mode():
            for step, seen in enumerate(steps):
                ids = prompts[i] + generated[i][:step]
                want = model(input_ids=torch.tensor([ids])).logits[0, -1]
                torch.testing.assert_close(seen[i], want, atol=2e-3, rtol=0, msg=name)
        del model


def complete(server, model, max_tokens=8):
    r = server.openai().completions.create(
        model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    return r.choices[0].text


def common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def test_every_kind_serves_in_one_mixed_batch(bundled_server, kind_adapters):
    url = bundled_server.url
    kinds = {}
    for name, path in kind_adapters.items():
        r = httpx.post(f"{url}/adapters", json={"name": name, "path": str(path)}, timeout=300)
        assert r.status_code == 201, r.text
        kinds[name] = r.json()["kind"]
    assert sorted(kinds.values()) == sorted(
        ["ia3", "prompt_tuning", "p_tuning", "prefix_tuning", "ln_tuning", "lora"]
    )
    order = ["base", *kind_adapters]
    alone = {m: complete(bundled_server, m) for m in order}
    for name in kind_adapters:
        assert alone[name] != alone["base"], (name, alone)  # each adapter changes the answer

    async def together():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=600)
        jobs = [
            client.completions.create(
                model=m, prompt=PROMPT, max_tokens=8, temperature=0,
                extra_body={"ignore_eos": True},
            )
            for m in order
        ]  # fmt: skip
        return [r.choices[0].text for r in await asyncio.gather(*jobs)]

    mixed = asyncio.run(together())
    # one forward over every row, each with its own kind of adapter; as in
    # test_bundled_adapters.py a bfloat16 matmul over several rows may round differently
    # from one over a single row, so compare the start and the closest answer
    for i, model in enumerate(order):
        shared = {m: common_prefix(mixed[i], alone[m]) for m in order}
        assert shared[model] >= 4, (model, mixed[i], alone[model])
        assert shared[model] == max(shared.values()), (model, shared)
    for name in kind_adapters:  # the server is shared by the other integration tests
        assert httpx.delete(f"{url}/adapters/{name}").status_code == 200


def test_base_names_on_the_bundled_model(bundled_server, kind_adapters, tmp_path):
    url = bundled_server.url
    cases = {
        "google/gemma-3-270m": (201, "matches"),
        "unsloth/gemma-3-270m-unsloth-bnb-4bit": (201, "matches"),
        "/data/models/adapters": (201, "unverified"),
        "google/gemma-3-270m-it": (400, None),
        "meta-llama/Llama-3.2-1B": (400, None),
    }
    for i, (base_name, (status, check)) in enumerate(cases.items()):
        path = tmp_path / f"named-{i}"
        shutil.copytree(kind_adapters["k-lora"], path)
        config = json.loads((path / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = base_name
        (path / "adapter_config.json").write_text(json.dumps(config))
        r = httpx.post(
            f"{url}/adapters", json={"name": f"named-{i}", "path": str(path)}, timeout=300
        )
        assert r.status_code == status, (base_name, r.text)
        if status == 201:
            assert r.json()["base_check"]["status"] == check, (base_name, r.json())
            assert httpx.delete(f"{url}/adapters/named-{i}").status_code == 200
        else:
            assert r.json()["error"]["code"] == "base_model_mismatch"
