"""The rules that pick training settings from the data (trainer/defaults.py), and early
stopping on eval loss."""

from __future__ import annotations

import json

import pytest

from tests.trainer.helpers import QA, house, write_jsonl
from trainer import cli, defaults
from trainer.common import CARD_NAME
from trainer.defaults import resolve_defaults
from trainer.dpo import DPOJobConfig
from trainer.sft import SFTJobConfig, run_sft


def chosen(config, kind="sft", n=60, n_eval_file=None):
    resolved, d = resolve_defaults(config, kind, n, n_eval_file)
    return resolved, {name: c.value for name, c in d.choices.items()}, d


def test_small_data_gets_a_split_more_passes_a_higher_rate_and_early_stopping():
    resolved, values, d = chosen(SFTJobConfig(), n=60)
    # 10% held out (6), 54 train: 14 steps of 4 an epoch, 3 epochs = 42 steps, raised to 60
    assert (d.n_train, d.n_eval) == (54, 6)
    assert values["max_steps"] == 60 and resolved.max_steps == 60
    assert values["learning_rate"] == pytest.approx(5e-4)  # qlora 2e-4 x 2.5 (short run)
    assert values["warmup_steps"] == 6
    assert values["eval_steps"] == 6 and values["early_stopping_patience"] == 3
    assert set(d.auto) == set(defaults.AUTO_FIELDS)
    # resolving twice changes nothing, and the result is a valid config
    again, values_again, _ = chosen(resolved, n=60)
    assert again == resolved
    assert SFTJobConfig.from_dict(resolved.to_dict()) == resolved


def test_tiny_data_trains_on_everything_for_at_least_the_minimum_steps():
    _, values, d = chosen(SFTJobConfig(), n=12)
    assert d.n_eval == 0 and values["eval_fraction"] == 0.0
    assert values["max_steps"] == defaults.MIN_STEPS
    assert values["eval_steps"] == 0 and values["early_stopping_patience"] == 0
    assert "small data needs more passes" in d.choices["max_steps"].why


@pytest.mark.parametrize(
    ("n", "epochs", "lr"),
    [(1_000, 3, 2e-4), (5_000, 2, 2e-4), (20_000, 1, 2e-4), (10**6, None, 2e-4)],
)
def test_larger_data_gets_fewer_passes(n, epochs, lr):
    _, values, d = chosen(SFTJobConfig(), n=n)
    assert d.n_eval == min(defaults.MAX_EVAL, round(n * 0.1))
    if epochs is None:  # capped
        assert values["max_steps"] == defaults.MAX_STEPS
    else:
        assert values["max_steps"] == -(-d.n_train * epochs // 4)
    assert values["learning_rate"] == pytest.approx(lr)
    assert values["warmup_steps"] == min(100, -(-values["max_steps"] // 10))


def test_given_values_are_kept_and_a_set_length_runs_to_its_end():
    config = SFTJobConfig(max_steps=7, learning_rate=1e-3, warmup_steps=0, eval_fraction=0.2)
    resolved, values, d = chosen(config, n=60)
    assert (values["max_steps"], values["learning_rate"], values["warmup_steps"]) == (7, 1e-3, 0)
    assert d.n_eval == 12 and not d.choices["max_steps"].auto
    # the user chose the length: no early stopping unless asked for
    assert values["eval_steps"] == 0 and values["early_stopping_patience"] == 0
    _, values, _ = chosen(SFTJobConfig(epochs=2.0), n=60)
    assert values["max_steps"] == 28
    _, values, _ = chosen(SFTJobConfig(eval_steps=2, early_stopping_patience=1), n=60)
    assert (values["eval_steps"], values["early_stopping_patience"]) == (2, 1)


def test_an_eval_file_replaces_the_split():
    _, values, d = chosen(SFTJobConfig(), n=60, n_eval_file=10)
    assert (d.n_train, d.n_eval) == (60, 10) and values["max_steps"] == defaults.MIN_STEPS
    assert values["early_stopping_patience"] == 3


def test_method_and_objective_set_the_learning_rate():
    _, values, _ = chosen(DPOJobConfig(), kind="dpo", n=40)
    assert values["learning_rate"] == pytest.approx(2e-4 * 0.25 * 2.5)
    _, values, _ = chosen(SFTJobConfig(quantization="none"), n=100_000)
    assert values["learning_rate"] == pytest.approx(2e-4)
    assert defaults.learning_rate_for("full", "sft", 1000)[0] == pytest.approx(2e-5)


class _State:
    def __init__(self):
        self.global_step = 0
        self.max_steps = 100


class _Control:
    should_training_stop = False
    should_evaluate = False


def test_early_stopping_stops_after_patience_and_restores_the_best_weights():
    import torch

    model = torch.nn.Linear(2, 2)
    frozen = model.bias
    frozen.requires_grad_(False)
    cb = defaults.make_early_stopping(patience=2)
    state, control = _State(), _Control()
    args = type("Args", (), {"eval_steps": 10})()
    best_weight = None
    for step, loss in [(1, 3.0), (2, 2.0), (3, 2.5), (4, 2.1)]:
        state.global_step = step
        with torch.no_grad():
            model.weight.fill_(float(step))
        cb.on_evaluate(None, state, control, metrics={"eval_loss": loss}, model=model)
        if step == 2:
            best_weight = model.weight.detach().clone()
            assert not control.should_training_stop
    assert control.should_training_stop and cb.stopped_at == 4
    cb.on_train_end(None, state, control, model=model)
    assert torch.equal(model.weight, best_weight)
    assert cb.summary() == {
        "best_eval_loss": 2.0,
        "best_step": 2,
        "stopped_early_at": 4,
        "eval_loss_history": [
            {"step": 1, "eval_loss": 3.0},
            {"step": 2, "eval_loss": 2.0},
            {"step": 3, "eval_loss": 2.5},
            {"step": 4, "eval_loss": 2.1},
        ],
    }
    # the last step is always evaluated, once
    state.global_step, control.should_evaluate = 100, False
    cb.on_step_end(args, state, control)
    assert not control.should_evaluate  # 100 is an eval step anyway
    state.max_steps = state.global_step = 95
    cb.on_step_end(args, state, control)
    assert control.should_evaluate


def test_defaults_drive_a_real_run_and_land_on_the_card(tiny_model_dir, tmp_path):
    # the eval answers contradict the training answers: once the house style is learnt,
    # eval loss can only get worse, so early stopping must stop the run
    def rows(answer, n):
        return [
            {
                "messages": [
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": house(answer)},
                ]
            }
            for q, _ in (QA * 4)[:n]
        ]

    data = write_jsonl(tmp_path / "d.jsonl", rows("hello world", 32))
    eval_file = write_jsonl(tmp_path / "e.jsonl", rows("lazy dog", 5))
    config = SFTJobConfig(
        base_model=str(tiny_model_dir),
        quantization="none",
        device="cpu",
        r=4,
        batch_size=8,
        max_length=128,
        eval_file=str(eval_file),
        eval_max_examples=1,
        eval_max_new_tokens=2,
        learning_rate=3e-2,
        early_stopping_patience=1,
    )
    out = tmp_path / "adapter"
    result = run_sft(config, data, out)
    card = json.loads((out / CARD_NAME).read_text())
    d = card["defaults"]
    assert (d["train_examples"], d["eval_examples"]) == (32, 5)
    assert d["chosen"]["max_steps"]["value"] == 60 and d["chosen"]["max_steps"]["auto"]
    assert d["chosen"]["learning_rate"]["auto"] is False
    assert card["hyperparameters"]["max_steps"] == 60
    assert card["hyperparameters"]["warmup_steps"] == 6
    assert card["hyperparameters"]["eval_steps"] == 6
    stop = d["early_stopping"]
    assert stop["stopped_early_at"] is not None and stop["stopped_early_at"] < 60
    assert result.steps == stop["stopped_early_at"]
    assert stop["best_step"] < stop["stopped_early_at"]
    # the weights written are the best eval's: the final eval loss is the best one
    assert card["eval"]["eval_loss"]["adapter"] == pytest.approx(stop["best_eval_loss"], rel=1e-4)


def test_cli_prints_the_settings_before_training_and_in_the_dry_run(
    tiny_model_dir, sft_data, tmp_path, capsys
):
    code = cli.main(
        ["train", "sft", "--data", str(sft_data), "--name", "x", "--base", str(tiny_model_dir),
         "--dry-run"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "max_steps = 60  [auto: 3 epochs of 2 steps" in out
    assert "learning_rate = 0.0005  [auto: qlora 0.0002" in out
    assert "eval_fraction = 0  [auto: fewer than 30 examples" in out
    code = cli.main(
        ["train", "sft", "--data", str(sft_data), "--name", "x", "--base", str(tiny_model_dir),
         "--quantization", "none", "--device", "cpu", "--rank", "4", "--max-steps", "1",
         "--output-dir", str(tmp_path / "a")]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert out.index("max_steps = 1  [given") < out.index("adapter:")
