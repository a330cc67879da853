"""Every method of the method table trains on the tiny model: the loss goes down, the base
is unchanged, the method's own parameters moved; a full fine-tune leaves a model folder and
an extracted LoRA. Bad input per method is a ConfigError naming the field, before anything
is written. The extraction recovers the rank of a known low-rank weight change."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.trainer.helpers import (
    assert_base_unchanged,
    loss_went_down,
    quick_config,
    snapshot_base,
)
from trainer.base_model import load_base_model
from trainer.common import ADAPTER_FILES, CARD_NAME
from trainer.config import ConfigError
from trainer.methods import METHODS, check_against_base, get_method, methods_markdown
from trainer.orpo import ORPOJobConfig
from trainer.sft import SFTJobConfig
from trainer.train import train

PEFT_TYPES = {
    "lora": "LORA",
    "qlora": "LORA",
    "ia3": "IA3",
    "prompt_tuning": "PROMPT_TUNING",
    "prefix_tuning": "PREFIX_TUNING",
    "p_tuning": "P_TUNING",
    "ln_tuning": "LN_TUNING",
}


def watch_trainable():
    """A TrainerCallback that keeps the trainable parameters as training starts."""
    from transformers import TrainerCallback

    class Watch(TrainerCallback):
        before: dict = {}

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            Watch.before = {
                n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
            }

    return Watch()


def method_config(model_dir, method, **overrides):
    # quick_config's r=4 is a LoRA field: the other methods keep its default
    fields = dict(method=method, max_steps=6, learning_rate=1e-2, r=4 if "lora" in method else 16)
    if method == "full":
        fields["learning_rate"] = 1e-3
    if method in ("prompt_tuning", "prefix_tuning", "p_tuning"):
        fields["num_virtual_tokens"] = 4
    fields.update(overrides)
    return quick_config(SFTJobConfig, model_dir, quantization=None, **fields)


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_trains_and_leaves_the_base_alone(tiny_model_dir, sft_data, tmp_path, method):
    config = method_config(tiny_model_dir, method)
    base = load_base_model(tiny_model_dir, quantization=config.quantization, device="cpu")
    snapshot = snapshot_base(base.model) if method != "full" else None
    on_disk = {p.name: p.read_bytes() for p in tiny_model_dir.glob("*.safetensors")}
    watch = watch_trainable()
    out = tmp_path / "trained" / "adapter"
    model_dir = tmp_path / "models" / "adapter"

    result = train(
        config, sft_data, out, base=base, name="adapter", model_dir=model_dir, callbacks=[watch]
    )

    assert loss_went_down(result.loss_history), result.loss_history
    # the method's own parameters moved (full: the base model given was trained in place;
    # result.model is then the extracted LoRA)
    trained = base.model if method == "full" else result.model
    moved = [
        n
        for n, p in trained.named_parameters()
        if n in watch.before and not p.detach().equal(watch.before[n])
    ]
    assert moved, f"no trainable parameter of {method} changed"
    card = json.loads((out / CARD_NAME).read_text())
    assert card["method"]["name"] == method and card["kind"] == "sft"
    params = card["method"]["parameters"]
    assert 0 < params["trainable"] <= params["base"]
    assert card["adapter_bytes"] == (out / ADAPTER_FILES[1]).stat().st_size
    # other methods' fields are not on the card
    assert ("num_virtual_tokens" in card["hyperparameters"]) == (
        "num_virtual_tokens" in get_method(method).fields
    )
    assert sorted(p.name for p in out.iterdir()) == sorted([*ADAPTER_FILES, CARD_NAME])
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    # the base model folder itself is never written to
    assert {p.name: p.read_bytes() for p in tiny_model_dir.glob("*.safetensors")} == on_disk
    if method != "full":
        assert_base_unchanged(snapshot)
        assert adapter_config["peft_type"] == PEFT_TYPES[method]
        assert params["trainable_pct"] < 50  # (the P-tuning encoder is large on a tiny base)
        assert not model_dir.exists()
        return
    # full: every weight trained, a model folder, and the extracted LoRA as the adapter
    assert params["trainable"] == params["base"]
    assert adapter_config["peft_type"] == "LORA"
    extraction = card["extraction"]
    assert extraction["model_dir"] == str(model_dir)
    assert 0 <= extraction["relative_error"] < 1 and 0 < extraction["linear_share"] <= 1
    assert extraction["layers"] == 14  # 2 layers x (q, k, v, o, gate, up, down)
    tuned = load_base_model(model_dir, quantization="none", device="cpu")
    fresh = load_base_model(tiny_model_dir, quantization="none", device="cpu")
    tuned_params = dict(tuned.model.named_parameters())
    assert any(not p.equal(tuned_params[n]) for n, p in fresh.model.named_parameters())
    assert json.loads((model_dir / CARD_NAME).read_text())["method"]["name"] == "full"


def test_full_evaluates_the_model_and_its_extracted_adapter(tiny_model_dir, sft_data, tmp_path):
    config = method_config(
        tiny_model_dir,
        "full",
        max_steps=4,
        eval_fraction=0.25,
        eval_max_examples=2,
        eval_max_new_tokens=4,
        extract_rank=4,
    )
    updates = []
    out = tmp_path / "trained" / "full"
    result = train(
        config, sft_data, out, model_dir=tmp_path / "models" / "full", progress=updates.append
    )
    ev = result.card["eval"]
    assert set(ev["eval_loss"]) == {"base", "adapter"}
    assert {"base", "adapter", "extracted"} <= set(ev)
    extracted = ev["extracted"]
    assert extracted["eval_loss"] is not None and extracted["adapter"]["n"] == 2
    assert result.card["extraction"]["ranks"] == {"min": 4, "median": 4, "max": 4}
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and not adapter_config["rank_pattern"]
    # eval progress counts base, full and extracted answers
    last = [u for u in updates if u.phase == "eval"][-1]
    assert last.eval_done == last.eval_total == 6


def test_extraction_recovers_a_known_rank(tiny_model_dir):
    """A weight change of rank 2 on some layers and rank 5 on one comes back exactly:
    those ranks, relative error ~0, and the LoRA reproduces the fine-tuned outputs."""
    import copy

    import torch

    from trainer.extract import extract_lora

    base = load_base_model(tiny_model_dir, quantization="none", device="cpu")
    reference = base.model
    tuned = copy.deepcopy(reference)
    torch.manual_seed(0)
    ranks = {
        "model.layers.0.self_attn.q_proj": 2,
        "model.layers.1.mlp.down_proj": 2,
        "model.layers.1.self_attn.o_proj": 5,
    }
    with torch.no_grad():
        for path, rank in ranks.items():
            layer = tuned.get_submodule(path)
            out_f, in_f = layer.weight.shape
            layer.weight += torch.randn(out_f, rank) @ torch.randn(rank, in_f) * 0.1
    config = SFTJobConfig(method="full", extract_energy=0.999999)
    report, peft_model = extract_lora(reference, tuned, config)

    assert report["layers"] == 3  # the untouched layers carry nothing
    found = {row["module"]: row["rank"] for row in report["per_layer"]}
    assert found == ranks
    assert report["relative_error"] < 1e-5 and report["linear_share"] == pytest.approx(1.0)
    ids = torch.tensor([[5, 17, 42, 7, 99]])
    with torch.no_grad():
        want = tuned(ids).logits
        got = peft_model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    # a lower fixed rank keeps the top singular directions: a positive, smaller error
    report, _ = extract_lora(
        load_base_model(tiny_model_dir, quantization="none", device="cpu").model,
        tuned,
        SFTJobConfig(method="full", extract_rank=1),
    )
    assert report["ranks"] == {"min": 1, "median": 1, "max": 1}
    assert 0.05 < report["relative_error"] < 1


@pytest.mark.parametrize(
    ("fields", "field", "needle"),
    [
        ({"method": "full", "quantization": "nf4"}, "quantization", "cannot be trained"),
        ({"method": "lora", "quantization": "nf4"}, "quantization", "method 'qlora'"),
        ({"method": "qlora", "quantization": "none"}, "quantization", "method 'lora'"),
        ({"method": "ia3", "r": 8}, "r", "only used by methods lora and qlora"),
        ({"method": "lora", "num_virtual_tokens": 8}, "num_virtual_tokens", "prompt_tuning"),
        ({"method": "ia3", "trainable_tokens": "none"}, "trainable_tokens", "lora"),
        ({"method": "prompt_tuning", "num_virtual_tokens": 0}, "num_virtual_tokens", "1..512"),
        ({"method": "prompt_tuning", "prompt_tuning_init_text": " "}, "prompt_tuning_init_text", ""),
        ({"method": "prefix_tuning", "gradient_checkpointing": True}, "gradient_checkpointing", ""),
        ({"method": "p_tuning", "encoder_reparameterization_type": "GRU"}, "encoder_reparameterization_type", ""),
        ({"method": "ia3", "target_modules": ["q_proj"], "feedforward_modules": ["down_proj"]}, "feedforward_modules", "must be a target"),
        ({"method": "full", "extract_rank": 0}, "extract_rank", "1..256"),
        ({"method": "full", "extract_energy": 1.5}, "extract_energy", "(0, 1]"),
        ({"method": "sgd"}, "method", "lora, qlora, ia3"),
    ],
)  # fmt: skip
def test_config_checks_name_the_field(fields, field, needle):
    with pytest.raises(ConfigError) as info:
        SFTJobConfig(**fields)
    assert info.value.field == field
    assert needle in str(info.value)


def test_orpo_refuses_prompt_methods_with_the_reason():
    for method in ("prompt_tuning", "p_tuning"):
        with pytest.raises(ConfigError, match="ORPOTrainer") as info:
            ORPOJobConfig(method=method)
        assert info.value.field == "method"
    ORPOJobConfig(method="prefix_tuning")  # its prefix is past key/values: no extra positions


@pytest.mark.parametrize(
    ("fields", "field", "needle"),
    [
        (
            {"method": "prompt_tuning", "num_virtual_tokens": 400, "max_length": 128},
            "num_virtual_tokens",
            "more than the base model's context of 512",
        ),
        ({"method": "ia3", "target_modules": ["c_attn"]}, "target_modules", "not a module"),
        ({"method": "lora", "target_modules": ["qkv_proj"]}, "target_modules", "q_proj"),
        ({"method": "ln_tuning", "target_modules": ["q_proj"]}, "target_modules", "not a norm"),
        ({"method": "ia3", "target_modules": ["input_layernorm"]}, "target_modules", "linear"),
    ],
)
def test_checks_against_the_base_refuse_before_anything_is_written(
    tiny_model_dir, sft_data, tmp_path, fields, field, needle
):
    config = quick_config(SFTJobConfig, tiny_model_dir, quantization=None, r=16, **fields)
    with pytest.raises(ConfigError) as info:
        check_against_base(config, tiny_model_dir)
    assert info.value.field == field and needle in str(info.value)
    with pytest.raises(ConfigError):
        train(config, sft_data, tmp_path / "trained" / "x", model_dir=tmp_path / "models" / "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft.jsonl"]


def test_full_refuses_an_already_quantized_base_folder(tiny_model_dir, tmp_path):
    folder = tmp_path / "prequantized"
    shutil.copytree(tiny_model_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(cfg))
    config = SFTJobConfig(method="full", base_model=str(folder))
    with pytest.raises(ConfigError, match="already quantized") as info:
        check_against_base(config, folder)
    assert info.value.field == "method"


def test_methods_table_in_the_readme_is_the_generated_one():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert methods_markdown() in readme, "regenerate with: python -m trainer.methods"
