import json

import pytest

from tests.trainer.helpers import (
    assert_base_unchanged,
    assert_lora_trained,
    loss_went_down,
    quick_config,
    snapshot_base,
)
from trainer.base_model import load_base_model
from trainer.common import CARD_NAME
from trainer.config import ConfigError
from trainer.data import DataError
from trainer.dpo import DPOJobConfig, run_dpo


def test_dpo_qlora_trains_against_base_as_reference(tiny_model_dir, dpo_data, tmp_path):
    config = DPOJobConfig(
        base_model=str(tiny_model_dir),
        quantization="nf4",
        device="cpu",
        r=8,
        learning_rate=1e-2,
        max_steps=6,
        batch_size=4,
        max_length=128,
        eval_fraction=0.25,
        eval_max_examples=2,
        eval_max_new_tokens=4,
    )
    base = load_base_model(tiny_model_dir, quantization="nf4", device="cpu")
    snapshot = snapshot_base(base.model)
    out = tmp_path / "dpo-adapter"

    result = run_dpo(config, dpo_data, out, base=base)

    assert_base_unchanged(snapshot)
    assert_lora_trained(out)
    # DPO starts at log 2 exactly: policy == reference while lora_B is zero
    assert result.loss_history[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert loss_went_down(result.loss_history), result.loss_history
    card = json.loads((out / CARD_NAME).read_text())
    assert card["kind"] == "dpo" and card["hyperparameters"]["beta"] == 0.1
    assert card["eval"]["examples"] == 2
    assert card["eval"]["eval_loss"]["adapter"] < card["eval"]["eval_loss"]["base"]
    assert "exact_match" in card["eval"]["adapter"]


def test_dpo_config_and_data_checks(tiny_model_dir, sft_data, tmp_path):
    with pytest.raises(ConfigError, match="beta"):
        DPOJobConfig(beta=0)
    with pytest.raises(DataError, match="line 1"):
        run_dpo(DPOJobConfig(base_model=str(tiny_model_dir)), sft_data, tmp_path / "x")


def test_dpo_with_an_sft_term_adds_the_chosen_answers_nll(tiny_model_dir, dpo_data, tmp_path):
    """sft_weight > 0 (RPO): the loss is DPO's log 2 plus the NLL of the chosen answers at
    the first step, and it goes down; the card records the weight."""
    config = quick_config(DPOJobConfig, tiny_model_dir, r=8, max_steps=6, sft_weight=1.0)
    result = run_dpo(config, dpo_data, tmp_path / "rpo")
    first = result.loss_history[0]["loss"]
    assert first > 0.6931 + 1.0, result.loss_history  # log 2 + a random model's NLL
    assert loss_went_down(result.loss_history), result.loss_history
    card = json.loads((tmp_path / "rpo" / CARD_NAME).read_text())
    assert card["hyperparameters"]["sft_weight"] == 1.0
    for bad in (-1, "x", 1000):
        with pytest.raises(ConfigError, match="sft_weight"):
            DPOJobConfig(sft_weight=bad)
