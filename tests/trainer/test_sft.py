import json

import pytest

from tests.trainer.helpers import (
    assert_base_unchanged,
    assert_lora_trained,
    loss_went_down,
    snapshot_base,
)
from trainer.base_model import load_base_model
from trainer.common import ADAPTER_FILES, CARD_NAME, TrainingCancelled
from trainer.config import ConfigError
from trainer.sft import SFTJobConfig, run_sft


def fast_config(tiny_model_dir, **overrides) -> SFTJobConfig:
    fields = dict(
        base_model=str(tiny_model_dir),
        device="cpu",
        r=8,
        learning_rate=1e-2,
        max_steps=8,
        batch_size=4,
        max_length=128,
        eval_fraction=0.0,
        eval_max_examples=2,
        eval_max_new_tokens=4,
        warmup_steps=0,
    )
    fields.update(overrides)
    return SFTJobConfig(**fields)


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_sft_trains_adapter_and_leaves_base_alone(tiny_model_dir, sft_data, tmp_path, quantization):
    config = fast_config(
        tiny_model_dir,
        quantization=quantization,
        eval_fraction=0.25 if quantization == "none" else 0,
    )
    base = load_base_model(tiny_model_dir, quantization=quantization, device="cpu")
    snapshot = snapshot_base(base.model)
    updates = []
    out = tmp_path / "adapter"

    result = run_sft(config, sft_data, out, progress=updates.append, base=base)

    assert_base_unchanged(snapshot)
    assert_lora_trained(out)
    assert loss_went_down(result.loss_history), result.loss_history
    assert sorted(p.name for p in out.iterdir()) == sorted([*ADAPTER_FILES, CARD_NAME])
    assert not list(tmp_path.glob(".adapter*")), "temp folders left behind"
    # progress: every step reported, with total, loss and eta
    assert [u.step for u in updates] == list(range(1, 9))
    assert all(u.total_steps == 8 and u.loss is not None for u in updates)
    assert updates[-1].eta_s == 0 and updates[-1].progress == 1.0

    card = json.loads((out / CARD_NAME).read_text())
    assert card["base_model"]["fingerprint"] and card["base_model"]["quantization"] == quantization
    assert card["data"]["sha256"] and card["data"]["examples"] == 8
    assert card["hyperparameters"]["r"] == 8
    assert set(card["libraries"]) >= {"torch", "transformers", "peft", "trl", "bitsandbytes"}
    assert card["train"]["final_loss"] == result.loss_history[-1]["loss"]
    assert card["memory"]["peak_rss_bytes"] > 0 and card["wall_time_s"] > 0
    assert card["mixed_batch_servable"] is True
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8
    if quantization == "none":
        ev = card["eval"]
        assert ev["examples"] == 2
        assert ev["eval_loss"]["adapter"] < ev["eval_loss"]["base"]
        for arm in ("base", "adapter"):
            assert set(ev[arm]) == {"exact_match", "token_f1", "n"} and ev[arm]["n"] == 2


def test_dora_is_flagged_not_mixed_batch_servable(tiny_model_dir, sft_data, tmp_path):
    config = fast_config(tiny_model_dir, quantization="none", use_dora=True, max_steps=2)
    result = run_sft(config, sft_data, tmp_path / "dora")
    assert result.card["mixed_batch_servable"] is False
    assert "DoRA" in result.card["serving_note"]


def test_cancel_leaves_nothing(tiny_model_dir, sft_data, tmp_path):
    steps = []
    config = fast_config(tiny_model_dir, quantization="none", max_steps=50)
    with pytest.raises(TrainingCancelled):
        run_sft(
            config,
            sft_data,
            tmp_path / "adapter",
            progress=lambda u: steps.append(u.step),
            should_stop=lambda: len(steps) >= 2,
        )
    assert len(steps) < 50
    assert list(tmp_path.iterdir()) == [sft_data]


def test_existing_output_is_refused_before_loading(tiny_model_dir, sft_data, tmp_path):
    (tmp_path / "adapter").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        run_sft(fast_config(tiny_model_dir), sft_data, tmp_path / "adapter")


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("r", 0, "1..256"),
        ("r", 257, "1..256"),
        ("r", 8.5, "1..256"),
        ("lora_alpha", 0, "> 0"),
        ("lora_dropout", 1.0, "0 <= dropout < 1"),
        ("lora_dropout", -0.1, "0 <= dropout < 1"),
        ("learning_rate", 0, "(0, 1)"),
        ("learning_rate", 1.5, "(0, 1)"),
        ("batch_size", 0, ">= 1"),
        ("gradient_accumulation_steps", 0, ">= 1"),
        ("max_steps", 0, ">= 1"),
        ("epochs", 0, "> 0"),
        ("max_length", 4, ">= 16"),
        ("eval_fraction", 1.0, "0 <= fraction < 1"),
        ("quantization", "int8", "'nf4' (QLoRA) or 'none'"),
        ("target_modules", [], "non-empty list"),
        ("lr_scheduler_type", "wild", "one of"),
        ("use_dora", "yes", "true or false"),
        ("device", "tpu", "'auto', 'cpu'"),
    ],
)
def test_config_validation_names_field_and_fix(field, value, needle):
    with pytest.raises(ConfigError) as info:
        SFTJobConfig(**{field: value})
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}:")
    assert needle in str(info.value)


def test_config_from_dict_round_trip_and_unknown_keys():
    config = SFTJobConfig.from_dict({"r": 4, "target_modules": ["q_proj", "v_proj"]})
    assert SFTJobConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown field.*rank.*valid fields"):
        SFTJobConfig.from_dict({"rank": 4})
    assert all(SFTJobConfig.field_help().values()), "every field needs help text"
