"""Every adapter kind through the real server and the `openai` SDK: registered, described
with its kind and size, served per request with PEFT's greedy tokens, alone and in one
mixed batch; bad adapters of each kind refused with a 400 that names the problem, the
registry unchanged."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import openai
import pytest
import torch

from tests.server.test_adapter_kinds import _configs
from tests.support import peft_greedy, start_live_server
from tests.tiny_model import build_lora_adapter, build_peft_adapter

PROMPT = "Hello world, this is"
MAX_MODEL_LEN = 64


@pytest.fixture(scope="module")
def adapters(tiny_model_path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kind-adapters")
    made = {
        name: build_peft_adapter(tiny_model_path, root / name, config, seed=i + 3)
        for i, (name, config) in enumerate(_configs().items())
    }
    made["lora"] = build_lora_adapter(tiny_model_path, root / "lora", r=4, seed=5)
    # rows for tokens of the prompt, so that they change this untied model's answer
    from peft import TrainableTokensConfig
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_model_path)(PROMPT)["input_ids"]
    made["tokens"] = build_peft_adapter(
        tiny_model_path, root / "tokens-prompt", TrainableTokensConfig(token_indices=ids[1:4])
    )
    return made


@pytest.fixture(scope="module")
def server(tiny_model_path, tmp_path_factory):
    data = tmp_path_factory.mktemp("kind-data")
    server = start_live_server(
        base_model=str(tiny_model_path),
        quantization="none",
        max_model_len=MAX_MODEL_LEN,
        default_max_tokens=8,
        data_dir=data,
        max_loras=16,
        max_cpu_loras=16,
    )
    server.data_dir = data
    yield server
    server.stop()


def register(server, name, path):
    return httpx.post(f"{server.url}/adapters", json={"name": name, "path": str(path)}, timeout=60)


def complete(client, model, max_tokens=10, prompt=PROMPT):
    return client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip


EXPECTED_KIND = {
    "ia3": "ia3",
    "ia3-attn-out": "ia3",
    "prompt": "prompt_tuning",
    "p-mlp": "p_tuning",
    "p-lstm": "p_tuning",
    "prefix": "prefix_tuning",
    "prefix-proj": "prefix_tuning",
    "ln": "ln_tuning",
    "ln-linear": "ln_tuning",
    "tokens": "trainable_tokens",
    "lora": "lora",
}


def test_every_kind_registers_describes_itself_and_serves_as_peft(
    server, adapters, tiny_model_path
):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    prompt_ids = tok(PROMPT)["input_ids"]
    client = server.openai()
    expected = {}
    for name, path in adapters.items():
        r = register(server, name, path)
        assert r.status_code == 201, r.text
        info = r.json()
        assert info["kind"] == EXPECTED_KIND[name]
        assert info["parameters"] > 0 and info["size_bytes"] > 0
        assert (info["rank"] is not None) == (name == "lora")
        virtual = json.loads((path / "adapter_config.json").read_text()).get("num_virtual_tokens")
        assert info["virtual_tokens"] == (virtual or 0)
        assert info["base_check"]["status"] == "matches"
        assert httpx.get(f"{server.url}/adapters/{name}").json()["kind"] == info["kind"]
        expected[name] = tok.decode(
            peft_greedy(tiny_model_path, path, prompt_ids, 10), skip_special_tokens=True
        )
        assert complete(client, name).choices[0].text == expected[name], name
    base = tok.decode(peft_greedy(tiny_model_path, None, prompt_ids, 10), skip_special_tokens=True)
    same = [name for name, text in expected.items() if text == base]
    assert not same, f"{same} answer as the base: the comparison would prove nothing"

    async def together():
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        models = list(adapters) + ["base"] + list(adapters)
        jobs = [
            aclient.completions.create(
                model=m, prompt=PROMPT, max_tokens=10, temperature=0,
                extra_body={"ignore_eos": True},
            )
            for m in models
        ]  # fmt: skip
        return models, await asyncio.gather(*jobs)

    engine = server.app.state.engine
    engine.scheduler.stats.peak_batch_size = 0
    models, results = asyncio.run(together())
    expected["base"] = base
    for model, r in zip(models, results, strict=True):
        assert r.choices[0].text == expected[model], f"{model} diverged in the mixed batch"
    assert engine.scheduler.stats.peak_batch_size >= 4


def test_virtual_tokens_count_against_the_context(server, adapters):
    """A prefix adapter's 6 virtual tokens are positions of the context: a prompt that fits
    the base may not fit beside them, and the usage counts only the user's tokens."""
    client = server.openai()
    long_prompt = " ".join(["fox"] * 200)
    ids = server.app.state.engine.tokenize(long_prompt)[: MAX_MODEL_LEN - 4]
    r = client.completions.create(model="base", prompt=ids, max_tokens=2, temperature=0)
    assert r.usage.prompt_tokens == len(ids)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="prefix", prompt=ids, max_tokens=2, temperature=0)
    assert info.value.body["code"] == "context_length_exceeded"
    assert "6 virtual tokens" in info.value.body["message"]
    # without max_tokens the budget is what the context leaves: 64 - 52 - 6 = 6 (< 8)
    r = client.completions.create(model="prefix", prompt=ids[:52], temperature=0,
                                  extra_body={"ignore_eos": True})  # fmt: skip
    assert r.usage.prompt_tokens == 52 and r.usage.completion_tokens == 6
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="prefix", prompt=ids[:52], max_tokens=7)


@pytest.mark.parametrize("name", ["prompt", "p-mlp", "prefix"])
def test_echo_logprobs_cover_the_users_tokens_not_the_virtual_ones(
    server, adapters, tiny_model_path, name
):
    """lm-evaluation-harness's loglikelihood request (echo, logprobs, max_tokens 0) on an
    adapter that puts virtual tokens (or a KV prefix) before the prompt: one entry per token
    the user sent, the first null, each equal to PEFT's log-softmax at that token (PEFT's
    logits include the virtual positions; the served ones must not)."""
    from peft import PeftModel

    from tests.support import load_causal_lm

    r = register(server, name, adapters[name])
    assert r.status_code in (201, 409), r.text  # 409: registered by an earlier test
    virtual = json.loads((adapters[name] / "adapter_config.json").read_text())["num_virtual_tokens"]
    prompt = [2, 40, 41, 42, 43, 44, 45]
    lp = (
        server.openai()
        .completions.create(model=name, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
        .choices[0]
        .logprobs
    )
    assert len(lp.token_logprobs) == len(lp.tokens) == len(prompt)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None

    model = PeftModel.from_pretrained(load_causal_lm(tiny_model_path), str(adapters[name])).eval()
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt])).logits[0].float()
        base_logits = load_causal_lm(tiny_model_path)(torch.tensor([prompt])).logits[0].float()
    # prompt and p-tuning: (virtual + prompt, vocab); prefix tuning: (prompt, vocab)
    skip = logits.shape[0] - len(prompt)
    assert skip == (0 if name == "prefix" else virtual)
    ref = torch.log_softmax(logits[skip:], dim=-1)
    base_ref = torch.log_softmax(base_logits, dim=-1)
    for i in range(1, len(prompt)):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i - 1, prompt[i]]), abs=1e-4)
        assert max(lp.top_logprobs[i].values()) == pytest.approx(float(ref[i - 1].max()), abs=1e-4)
    # the adapter shows in them: they are not the base's
    assert any(
        abs(lp.token_logprobs[i] - float(base_ref[i - 1, prompt[i]])) > 1e-3
        for i in range(1, len(prompt))
    )


# --- bad adapters of each kind: a 400 naming the problem, nothing changed ----------------------


def snapshot(server):
    index = (server.data_dir / "adapters" / "registry.json").read_text()
    stored = sorted(p.name for p in (server.data_dir / "adapters" / "store").iterdir())
    listed = [a["name"] for a in httpx.get(f"{server.url}/adapters").json()["data"]]
    return listed, index, stored


def edited(src: Path, dest: Path, config_edit=None, tensor_edit=None) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    config = json.loads((dest / "adapter_config.json").read_text())
    if config_edit:
        config_edit(config)
    (dest / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(str(dest / "adapter_model.safetensors"))
    if tensor_edit:
        tensor_edit(tensors)
    save_file(tensors, str(dest / "adapter_model.safetensors"))
    return dest


def _rename(old: str, new: str):
    def edit(tensors):
        for key in list(tensors):
            tensors[key.replace(old, new)] = tensors.pop(key)

    return edit


def _bad_cases(adapters: dict[str, Path], tmp: Path, tiny_model_path: Path):
    from peft import PromptTuningConfig, TaskType

    many = build_peft_adapter(
        tiny_model_path,
        tmp / "many-virtual",
        PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=MAX_MODEL_LEN),
    )
    return {
        "ia3 for modules the base lacks": (
            edited(adapters["ia3"], tmp / "ia3-nomod", tensor_edit=_rename("q_proj", "query")),
            "base_model_mismatch",
            "query",
        ),
        "ia3 for no module of the base": (
            edited(adapters["ia3"], tmp / "ia3-none", tensor_edit=_rename("layers", "blocks")),
            "no_matching_modules",
            "blocks",
        ),
        "ia3 vector of another width": (
            edited(
                adapters["ia3"],
                tmp / "ia3-wide",
                tensor_edit=lambda t: t.update(
                    {k: torch.ones(1, 96) for k in t if "down_proj" in k}
                ),
            ),
            "base_model_mismatch",
            "down_proj",
        ),
        "prompt tuning with more virtual tokens than the context allows": (
            many,
            "context_length_exceeded",
            f"num_virtual_tokens={MAX_MODEL_LEN}",
        ),
        "virtual tokens of another width": (
            edited(
                adapters["prompt"],
                tmp / "prompt-wide",
                config_edit=lambda c: c.update(token_dim=32),
                tensor_edit=lambda t: t.update(prompt_embeddings=torch.zeros(5, 32)),
            ),
            "base_model_mismatch",
            "32 wide",
        ),
        "prefix for another number of layers": (
            edited(
                adapters["prefix"],
                tmp / "prefix-layers",
                config_edit=lambda c: c.update(num_layers=4),
                tensor_edit=lambda t: t.update(prompt_embeddings=torch.zeros(6, 4 * 2 * 16)),
            ),
            "base_model_mismatch",
            "4 layers",
        ),
        "p-tuning that holds its encoder instead of its output": (
            edited(
                adapters["p-mlp"],
                tmp / "p-encoder",
                tensor_edit=lambda t: t.update(
                    {"prompt_encoder.mlp_head.0.weight": torch.zeros(32, 64)}
                ),
            ),
            "unsupported_adapter",
            "prompt_encoder.mlp_head.0.weight",
        ),
        "ln tuning for a norm the base lacks": (
            edited(
                adapters["ln"], tmp / "ln-nomod", tensor_edit=_rename("input_layernorm", "ln_1")
            ),
            "base_model_mismatch",
            "ln_1",
        ),
        "ln tuning of another width": (
            edited(
                adapters["ln"],
                tmp / "ln-wide",
                tensor_edit=lambda t: t.update({k: torch.ones(32) for k in t if ".norm." in k}),
            ),
            "base_model_mismatch",
            "model.norm.weight",
        ),
        "an unknown method": (
            edited(adapters["ia3"], tmp / "loha", config_edit=lambda c: c.update(peft_type="LOHA")),
            "unsupported_adapter",
            "LOHA",
        ),
        "trained token ids outside the vocabulary": (
            edited(
                adapters["tokens"],
                tmp / "tokens-oov",
                config_edit=lambda c: c.update(token_indices=[40, 41, 10**6]),
            ),
            "base_model_mismatch",
            "vocabulary",
        ),
    }


def test_bad_adapters_of_each_kind_are_refused_by_name(server, adapters, tmp_path, tiny_model_path):
    for what, (path, code, named) in _bad_cases(adapters, tmp_path, tiny_model_path).items():
        before = snapshot(server)
        r = register(server, "bad", path)
        assert r.status_code == 400, f"{what}: {r.text}"
        err = r.json()["error"]
        assert err["code"] == code, f"{what}: {err}"
        assert named in err["message"], f"{what}: {err['message']}"
        assert snapshot(server) == before, f"{what} changed the registry"
    assert not list((server.data_dir / "adapters" / ".staging").iterdir())
