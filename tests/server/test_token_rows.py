"""Adapters with trained token rows (PEFT's `trainable_token_indices`) in a mixed batch.

A base model that never learned a chat template's end-of-turn token cannot be taught to
emit it by LoRA on the linear layers alone; training that token's embedding row does it.
The engine applies such rows per row of the batch: the row's embedding of the token and,
in a tied model, its logit for the token come from its own adapter. PEFT is the reference,
row by row, on an untied and a tied Gemma and a tied Llama (SmolLM2's architecture), with
the trained tokens in the input.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.adapter_validation import AdapterError, validate_adapter_dir
from server.engine.base import BASE_ADAPTER
from server.engine.kinds.lora import read_peft_lora
from tests.support import load_causal_lm, model_with_adapters, multi_lora_logits
from tests.tiny_model import build_lora_adapter, build_tiny_model

ATOL = 1e-4
# ids of the tiny tokenizers' turn markers: <end_of_turn>/<start_of_turn> in the Gemma one,
# <|im_end|>/<|im_start|> in the Llama one
END_OF_TURN, START_OF_TURN = 5, 4


@pytest.fixture(scope="module", params=["gemma-untied", "gemma-tied", "llama-tied"])
def setup(request, tmp_path_factory):
    """A tiny model (untied or tied), three adapters, and PEFT's logits for each."""
    from peft import PeftModel

    root = tmp_path_factory.mktemp(f"token-rows-{request.param}")
    arch, ties = request.param.split("-")
    tied = ties == "tied"
    model_path = build_tiny_model(root / "model", tie_word_embeddings=tied, arch=arch)
    adapters = {
        "eot": build_lora_adapter(
            model_path, root / "eot", r=4, seed=1, trainable_token_indices=[END_OF_TURN]
        ),
        "two": build_lora_adapter(
            model_path,
            root / "two",
            r=2,
            seed=2,
            target_modules=["q_proj"],
            trainable_token_indices=[START_OF_TURN, END_OF_TURN],
        ),
        "plain": build_lora_adapter(model_path, root / "plain", r=4, seed=3),
    }
    inputs = torch.tensor([[2, START_OF_TURN, 40, 41, END_OF_TURN, 42, END_OF_TURN]])
    reference = {}
    with torch.inference_mode():
        reference[BASE_ADAPTER] = load_causal_lm(model_path)(inputs).logits[0]
        for name, path in adapters.items():
            peft_model = PeftModel.from_pretrained(load_causal_lm(model_path), str(path)).eval()
            reference[name] = peft_model(inputs).logits[0]
    return model_path, adapters, inputs, reference, tied


def test_token_rows_match_peft_alone_and_mixed(setup):
    model_path, adapters, inputs, reference, tied = setup
    model, lora = model_with_adapters(model_path, adapters)
    # the trained rows matter: without them the adapter's output would differ from PEFT's
    eot = read_peft_lora("eot", adapters["eot"])
    assert list(eot.tokens) == ["model.embed_tokens"]
    assert eot.tokens["model.embed_tokens"][0].tolist() == [END_OF_TURN]
    if tied:  # the output layer shares the rows: the end-of-turn logit moves
        delta = (reference["eot"][:, END_OF_TURN] - reference[BASE_ADAPTER][:, END_OF_TURN]).abs()
        assert delta.max() > 1e-2
    for name in ("eot", "two"):
        for row in multi_lora_logits(model, lora, [name, name], inputs):
            torch.testing.assert_close(row, reference[name], atol=ATOL, rtol=0)
    rows = ["two", BASE_ADAPTER, "eot", "plain", "eot", "two"]
    for row, name in zip(multi_lora_logits(model, lora, rows, inputs), rows, strict=True):
        torch.testing.assert_close(row, reference[name], atol=ATOL, rtol=0)


def test_removing_a_token_adapter_restores_the_base_rows(setup):
    model_path, adapters, inputs, reference, _ = setup
    model, lora = model_with_adapters(model_path, {n: adapters[n] for n in ("eot", "plain")})
    lora.remove("eot")
    rows = ["plain", BASE_ADAPTER]
    for row, name in zip(multi_lora_logits(model, lora, rows, inputs), rows, strict=True):
        torch.testing.assert_close(row, reference[name], atol=ATOL, rtol=0)


def _validate(path: Path, model_path: Path):
    from server.engine.hf import _float_params, _linear_shapes, _token_modules
    from server.engine.kinds.base import BaseModelShape

    model = load_causal_lm(model_path)
    base = BaseModelShape(
        linear=_linear_shapes(model),
        token_modules=_token_modules(model),
        params=_float_params(model),
        hidden_size=64,
        num_layers=2,
        names=frozenset({model_path.name}),
    )
    return validate_adapter_dir(path, base=base, max_rank=64, max_bytes=10**8)


def test_validation_reports_trained_tokens_and_refuses_bad_rows(setup, tmp_path):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    model_path, adapters, _, _, _ = setup
    assert _validate(adapters["two"], model_path).trained_tokens == [START_OF_TURN, END_OF_TURN]
    assert _validate(adapters["plain"], model_path).trained_tokens == []

    def broken(name: str, config_edit=None, tensor_edit=None) -> Path:
        out = tmp_path / name
        shutil.copytree(adapters["eot"], out)
        config = json.loads((out / "adapter_config.json").read_text())
        if config_edit:
            config_edit(config)
        (out / "adapter_config.json").write_text(json.dumps(config))
        tensors = load_file(str(out / "adapter_model.safetensors"))
        if tensor_edit:
            tensor_edit(tensors)
        save_file(tensors, str(out / "adapter_model.safetensors"))
        return out

    key = next(k for k in load_file(str(adapters["eot"] / "adapter_model.safetensors"))
               if "trainable_tokens_delta" in k)  # fmt: skip
    cases = {
        "out of vocabulary": (
            broken("oov", lambda c: c.update(trainable_token_indices=[10**6])),
            "base_model_mismatch",
        ),
        "width of another model": (
            broken("wide", tensor_edit=lambda t: t.update({key: torch.zeros(1, 32)})),
            "base_model_mismatch",
        ),
        "more ids than rows": (
            broken("count", lambda c: c.update(trainable_token_indices=[4, 5])),
            "base_model_mismatch",
        ),
        "rows missing": (
            broken("missing", tensor_edit=lambda t: t.pop(key)),
            "invalid_weights",
        ),
        "rows for a module the base lacks": (
            broken(
                "elsewhere",
                tensor_edit=lambda t: t.update({key.replace("embed_tokens", "nope"): t.pop(key)}),
            ),
            "base_model_mismatch",
        ),
    }
    for what, (path, code) in cases.items():
        with pytest.raises(AdapterError) as info:
            _validate(path, model_path)
        assert info.value.code == code, what
        assert info.value.status == 400, what
