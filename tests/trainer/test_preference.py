"""ORPO and KTO on the tiny model, through the same skeleton as SFT and DPO: the loss goes
down, the base is unchanged, the card records the objective and its eval; KTO reads unpaired
thumbs-up/down answers (and pairs), and its data is checked line by line."""

from __future__ import annotations

import json

import pytest

from tests.trainer.helpers import (
    QA,
    assert_base_unchanged,
    assert_lora_trained,
    house,
    loss_went_down,
    quick_config,
    snapshot_base,
    write_jsonl,
)
from trainer.base_model import load_base_model
from trainer.common import CARD_NAME
from trainer.config import ConfigError
from trainer.data import DataError, load_jsonl
from trainer.kto import KTOJobConfig
from trainer.orpo import ORPOJobConfig
from trainer.train import train


@pytest.fixture
def kto_data(tmp_path):
    """Rated answers, as the feedback export writes them: liked house-style answers and
    disliked plain ones, for different prompts (no pairs)."""
    rows = []
    for i, (q, a) in enumerate(QA * 2):
        good = i % 2 == 0
        rows.append(
            {
                "prompt": [{"role": "user", "content": q}],
                "completion": house(a) if good else f"The answer is {a}.",
                "label": good,
            }
        )
    return write_jsonl(tmp_path / "kto.jsonl", rows)


def test_orpo_trains_without_a_reference(tiny_model_dir, dpo_data, tmp_path):
    config = quick_config(
        ORPOJobConfig,
        tiny_model_dir,
        max_steps=6,
        eval_fraction=0.25,
        eval_max_examples=2,
        eval_max_new_tokens=4,
    )
    base = load_base_model(tiny_model_dir, quantization="none", device="cpu")
    snapshot = snapshot_base(base.model)
    out = tmp_path / "orpo"
    result = train(config, dpo_data, out, base=base)
    assert_base_unchanged(snapshot)
    assert_lora_trained(out)
    assert loss_went_down(result.loss_history), result.loss_history
    card = json.loads((out / CARD_NAME).read_text())
    assert card["kind"] == "orpo" and card["hyperparameters"]["beta"] == 0.1
    ev = card["eval"]
    # ORPO's loss is NLL + beta * odds-ratio term: the base has a real (high) value
    assert ev["eval_loss"]["adapter"] < ev["eval_loss"]["base"]
    assert ev["reward_accuracy"] is not None and "exact_match" in ev["adapter"]


def test_kto_trains_on_unpaired_ratings(tiny_model_dir, kto_data, tmp_path):
    config = quick_config(
        KTOJobConfig,
        tiny_model_dir,
        max_steps=6,
        eval_fraction=0.25,
        eval_max_examples=8,
        eval_max_new_tokens=4,
        desirable_weight=1.0,  # equal weights: the loss of the base is exactly 0.5
    )
    base = load_base_model(tiny_model_dir, quantization="none", device="cpu")
    snapshot = snapshot_base(base.model)
    out = tmp_path / "kto"
    result = train(config, kto_data, out, base=base)
    assert_base_unchanged(snapshot)
    assert_lora_trained(out)
    # KTO starts at 0.5: policy == reference while lora_B is zero (rewards 0, 1 - sigmoid(0))
    assert result.loss_history[0]["loss"] == pytest.approx(0.5, abs=1e-3)
    assert loss_went_down(result.loss_history), result.loss_history
    card = json.loads((out / CARD_NAME).read_text())
    assert card["kind"] == "kto" and card["data"]["format"] == "unpaired"
    ev = card["eval"]
    assert ev["eval_loss"]["base"] == pytest.approx(0.5, abs=0.05)
    assert ev["eval_loss"]["adapter"] < ev["eval_loss"]["base"]
    # generated answers are scored against the liked answers only
    held_out = load_jsonl(kto_data, "kto").examples
    liked = sum(1 for e in held_out if e.label)
    assert 0 < ev["adapter"]["n"] <= min(liked, ev["examples"])


def test_kto_takes_pairs_and_other_methods(tiny_model_dir, dpo_data, tmp_path):
    """Each pair is one liked and one disliked answer; the method axis is free (IA3 here)."""
    config = quick_config(KTOJobConfig, tiny_model_dir, method="ia3", r=16, max_steps=3)
    result = train(config, dpo_data, tmp_path / "kto-ia3")
    assert result.card["method"]["name"] == "ia3"
    assert result.card["data"]["format"] == "preference"
    adapter_config = json.loads((tmp_path / "kto-ia3" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "IA3"


def test_kto_data_and_config_checks(tmp_path, sft_data):
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"prompt": "Q", "completion": "A", "label": True},
            {"prompt": "Q", "completion": "A", "label": "yes"},
            {"prompt": "Q", "label": False},
            {"prompt": "Q", "completion": "A"},
        ],
    )
    with pytest.raises(DataError) as info:
        load_jsonl(bad, "kto")
    found = {(p.line, p.field) for p in info.value.problems}
    assert found == {(2, "label"), (3, "completion"), (4, "label")}
    rated = write_jsonl(
        tmp_path / "rated.jsonl", [{"prompt": "Q", "completion": "A", "label": 1 > 0}]
    )
    for task, needle in (("sft", "train kto"), ("dpo", "DPO needs chosen/rejected")):
        with pytest.raises(DataError, match=needle):
            load_jsonl(rated, task)
    with pytest.raises(DataError, match="KTO needs"):
        load_jsonl(sft_data, "kto")
    with pytest.raises(ConfigError) as err:
        KTOJobConfig(batch_size=1)
    assert err.value.field == "batch_size"
    with pytest.raises(ConfigError) as err:
        KTOJobConfig(undesirable_weight=0)
    assert err.value.field == "undesirable_weight"
    # left to trainer.defaults: the method table's rate times KTO's LR_SCALE
    from trainer.defaults import learning_rate_for

    assert KTOJobConfig().learning_rate is None
    assert learning_rate_for("qlora", "kto", 1000)[0] == pytest.approx(5e-5)  # 2e-4 / 4


def test_kto_balances_liked_and_disliked_answers_from_the_data(tmp_path):
    """Feedback is rarely balanced: without --desirable-weight the weight is chosen so that
    liked x weight / disliked x undesirable_weight sits inside the KTO paper's [1, 4/3]
    (where TRL stops warning); given, it is kept; one-sided data keeps 1."""
    from trainer.defaults import resolve_for_data
    from trainer.kto import BALANCE

    def rated(liked: int, disliked: int):
        rows = [
            {"prompt": f"Q{i}", "completion": f"A{i}", "label": i < liked}
            for i in range(liked + disliked)
        ]
        return load_jsonl(write_jsonl(tmp_path / f"r{liked}-{disliked}.jsonl", rows), "kto")

    config, chosen = resolve_for_data(KTOJobConfig(), "kto", rated(3, 15))
    w = config.desirable_weight
    assert chosen.choices["desirable_weight"].auto and chosen.choices["desirable_weight"].value == w
    assert 1 <= 3 * w / (15 * 1.0) <= 4 / 3 and w == pytest.approx(BALANCE * 5, abs=0.01)
    assert "3 liked, 15 disliked" in "\n".join(chosen.describe())

    config, _ = resolve_for_data(KTOJobConfig(undesirable_weight=2.0), "kto", rated(12, 4))
    assert 1 <= 12 * config.desirable_weight / (4 * 2.0) <= 4 / 3

    config, chosen = resolve_for_data(KTOJobConfig(desirable_weight=0.5), "kto", rated(3, 15))
    assert config.desirable_weight == 0.5 and not chosen.choices["desirable_weight"].auto

    config, chosen = resolve_for_data(KTOJobConfig(), "kto", rated(0, 6))
    assert config.desirable_weight == 1.0
    assert "nothing to balance" in chosen.choices["desirable_weight"].why
    with pytest.raises(ConfigError) as err:
        KTOJobConfig(desirable_weight=-1)
    assert err.value.field == "desirable_weight"
