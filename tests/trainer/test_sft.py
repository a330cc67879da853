import json
import re

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
    train_updates = [u for u in updates if u.phase == "train"]
    assert [u.step for u in train_updates] == list(range(1, 9))
    assert all(u.total_steps == 8 and u.loss is not None for u in train_updates)
    assert train_updates[-1].eta_s == 0 and train_updates[-1].progress == 1.0
    # then the eval reports its own progress: answers generated, base then adapter
    eval_updates = [(u.phase, u.step, u.eval_done, u.eval_total) for u in updates[8:]]
    if quantization == "none":
        assert eval_updates == [("eval", 8, 0, 4), ("eval", 8, 2, 4), ("eval", 8, 4, 4)]
    else:
        assert eval_updates == []

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


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("eval loss", "cancelled during eval (eval loss)"),
        ("between answers", "cancelled during eval (4 of 8 answers generated)"),
        ("mid-answer", "cancelled during eval (0 of 8 answers generated)"),
    ],
)
def test_cancel_during_eval_leaves_nothing(tiny_model_dir, sft_data, tmp_path, where, message):
    """The eval after the last step can take minutes on a CPU: a cancel must stop it
    within a forward pass, not after it."""
    updates = []
    calls_in_eval = []

    def should_stop() -> bool:
        if not any(u.phase == "eval" for u in updates):
            return False
        calls_in_eval.append(1)
        if where == "eval loss":
            return True
        if where == "between answers":
            return any((u.eval_done or 0) > 0 for u in updates)
        # one check per eval-loss batch, then one per generated token: 20 checks in, the
        # base answers are half way through their 40 tokens
        return len(calls_in_eval) > 20

    config = fast_config(
        tiny_model_dir,
        quantization="none",
        max_steps=2,
        eval_fraction=0.5,
        eval_max_examples=4,
        eval_max_new_tokens=40,
    )
    with pytest.raises(TrainingCancelled, match=re.escape(message)):
        run_sft(
            config,
            sft_data,
            tmp_path / "adapter",
            progress=updates.append,
            should_stop=should_stop,
        )
    assert [u.step for u in updates if u.phase == "train"] == [1, 2]
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
        ("quantization", "int8", "'nf4' (4-bit base) or 'none'"),
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
