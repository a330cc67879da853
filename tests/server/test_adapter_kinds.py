"""Every adapter kind, served per row, gives what PEFT's own forward gives.

PEFT is the reference: for each kind (IA3, prompt tuning, P-tuning with an MLP and an LSTM
encoder, prefix tuning, LN tuning, trainable tokens) an adapter built and saved by PEFT is
loaded by PeftModel, and its logits at every step of a greedy continuation (PEFT's forward
over the whole sequence, no cache) must equal the engine's: the runner's chunked prefill,
then decode steps on the KV cache, alone and in one batch that mixes every kind with LoRA
and base rows. Virtual tokens and KV prefixes take the row's own positions and cache; a
second group joining the running batch must not disturb either.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.engine.base import BASE_ADAPTER
from server.engine.runner import ModelRunner
from tests.support import load_causal_lm, read_adapter
from tests.tiny_model import build_lora_adapter, build_peft_adapter

ATOL = 1e-4


def _configs():
    from peft import (
        IA3Config,
        LNTuningConfig,
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptTuningConfig,
        TaskType,
        TrainableTokensConfig,
    )

    lm = TaskType.CAUSAL_LM
    return {
        "ia3": IA3Config(task_type=lm),
        "ia3-attn-out": IA3Config(
            task_type=lm,
            target_modules=["k_proj", "o_proj", "up_proj"],
            feedforward_modules=["up_proj"],
        ),
        "prompt": PromptTuningConfig(task_type=lm, num_virtual_tokens=5),
        "p-mlp": PromptEncoderConfig(task_type=lm, num_virtual_tokens=4, encoder_hidden_size=32),
        "p-lstm": PromptEncoderConfig(
            task_type=lm,
            num_virtual_tokens=3,
            encoder_hidden_size=16,
            encoder_reparameterization_type="LSTM",
        ),
        "prefix": PrefixTuningConfig(task_type=lm, num_virtual_tokens=6),
        "prefix-proj": PrefixTuningConfig(
            task_type=lm, num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=24
        ),
        "ln": LNTuningConfig(task_type=lm),
        # PEFT lets LN tuning copy any layer: here a linear one that LoRA and IA3 also wrap
        "ln-linear": LNTuningConfig(task_type=lm, target_modules=["q_proj", "down_proj", "norm"]),
        "tokens": TrainableTokensConfig(token_indices=[40, 41, 5]),
    }


@pytest.fixture(scope="module")
def adapters(tiny_model_path: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kinds")
    made = {
        name: build_peft_adapter(tiny_model_path, root / name, config, seed=i + 1)
        for i, (name, config) in enumerate(_configs().items())
    }
    made["lora"] = build_lora_adapter(tiny_model_path, root / "lora", r=4, seed=11)
    return made


@pytest.fixture(scope="module")
def peft_models(tiny_model_path, adapters):
    from peft import PeftModel

    models = {BASE_ADAPTER: load_causal_lm(tiny_model_path)}
    for name, path in adapters.items():
        models[name] = PeftModel.from_pretrained(load_causal_lm(tiny_model_path), str(path)).eval()
    return models


def reference_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


PROMPTS = [
    [2, 40, 41, 42, 43, 44, 45, 46, 47],
    [2, 50, 51],
    [2, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70],
    [2, 5, 40, 41, 5, 7],
]


def run_group(runner: ModelRunner, prompts, rows, chunk: int):
    group = runner.new_group(prompts, rows)
    while not group.finished:
        runner.prefill_chunk(group, chunk)
    return runner.finish_prefill(group)


def check_rows(peft_models, prompts, rows, logits, generated, step):
    for i, (prompt, name) in enumerate(zip(prompts, rows, strict=True)):
        want = reference_logits(peft_models[name], prompt + generated[i])
        torch.testing.assert_close(
            logits[i], want, atol=ATOL, rtol=0, msg=lambda m, n=name, s=step: f"{n} @ {s}: {m}"
        )


def greedy_rows(runner, peft_models, prompts, rows, *, steps=10, chunk=4):
    """Prefill, then decode greedily; every row's logits at every step equal PEFT's."""
    batch, logits = run_group(runner, prompts, rows, chunk)
    generated = [[] for _ in prompts]
    for step in range(steps):
        check_rows(peft_models, prompts, rows, logits, generated, step)
        tokens = logits.argmax(-1).tolist()
        for i, t in enumerate(tokens):
            generated[i].append(t)
        logits = runner.decode(batch, tokens, rows)
    return generated


@pytest.fixture(params=["reference", "fast"])
def runner_cls(request):
    """Every check runs on the reference path and on the fast path (decoder.py)."""
    from server.engine.fast_runner import FastModelRunner

    return ModelRunner if request.param == "reference" else FastModelRunner


def make_runner(model_path, adapters, names, runner_cls=ModelRunner) -> ModelRunner:
    runner = runner_cls(load_causal_lm(model_path), pad_token_id=0)
    for name in names:
        runner.adapters.add(read_adapter(name, adapters[name]))
    return runner


KINDS = list(_configs())


@pytest.mark.parametrize("name", KINDS)
def test_each_kind_alone_matches_peft(tiny_model_path, adapters, peft_models, name, runner_cls):
    runner = make_runner(tiny_model_path, adapters, [name], runner_cls)
    prompts = PROMPTS[:2]
    # the adapter changes the output: the comparison is not base against base
    diff = reference_logits(peft_models[name], prompts[0]) - reference_logits(
        peft_models[BASE_ADAPTER], prompts[0]
    )
    assert diff.abs().max() > 1e-2
    greedy_rows(runner, peft_models, prompts, [name, name], steps=8, chunk=3)


def test_every_kind_in_one_batch_with_lora_and_base_rows(
    tiny_model_path, adapters, peft_models, runner_cls
):
    names = KINDS + ["lora"]
    runner = make_runner(tiny_model_path, adapters, names, runner_cls)
    rows = names + [BASE_ADAPTER, "prefix", "prompt"]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(rows))]
    greedy_rows(runner, peft_models, prompts, rows, steps=10, chunk=5)


def test_a_group_joining_the_batch_leaves_running_rows_alone(
    tiny_model_path, adapters, peft_models, runner_cls
):
    """Rows with prefixes and virtual tokens decode; a second group (other kinds, other
    lengths) is prefilled and merged into the batch; every row still equals PEFT."""
    runner = make_runner(
        tiny_model_path, adapters, ["prefix", "prompt", "ia3", "ln", "p-mlp"], runner_cls
    )
    first_rows, first_prompts = ["prefix", BASE_ADAPTER, "prompt"], PROMPTS[:3]
    batch, logits = run_group(runner, first_prompts, first_rows, chunk=4)
    generated = [[] for _ in first_prompts]
    for _ in range(3):
        tokens = logits.argmax(-1).tolist()
        for i, t in enumerate(tokens):
            generated[i].append(t)
        logits = runner.decode(batch, tokens, first_rows)
    second_rows, second_prompts = (
        ["ia3", "p-mlp", "ln", "prefix"],
        [PROMPTS[3], PROMPTS[1], PROMPTS[0], PROMPTS[2]],
    )
    batch2, logits2 = run_group(runner, second_prompts, second_rows, chunk=16)
    batch.merge(batch2)
    rows = first_rows + second_rows
    prompts = first_prompts + second_prompts
    logits = torch.cat([logits, logits2])
    generated += [[] for _ in second_prompts]
    for step in range(6):
        check_rows(peft_models, prompts, rows, logits, generated, step)
        tokens = logits.argmax(-1).tolist()
        for i, t in enumerate(tokens):
            generated[i].append(t)
        logits = runner.decode(batch, tokens, rows)
    # a row leaves: the others carry on unchanged
    keep = [0, 2, 3, 6]
    batch.select(keep)
    rows, prompts = [rows[i] for i in keep], [prompts[i] for i in keep]
    generated, logits = [generated[i] for i in keep], logits[keep]
    for step in range(3):
        check_rows(peft_models, prompts, rows, logits, generated, f"after select {step}")
        tokens = logits.argmax(-1).tolist()
        for i, t in enumerate(tokens):
            generated[i].append(t)
        logits = runner.decode(batch, tokens, rows)


def test_removing_adapters_restores_the_base(tiny_model_path, adapters, peft_models):
    names = KINDS + ["lora"]
    runner = make_runner(tiny_model_path, adapters, names)
    for name in names:
        assert runner.adapters.remove(name) is not None
    greedy_rows(runner, peft_models, PROMPTS[:2], [BASE_ADAPTER] * 2, steps=3)
    with pytest.raises(KeyError):
        runner.adapters.set_rows(["prefix"])
