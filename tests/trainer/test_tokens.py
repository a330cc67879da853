"""Trainable token rows (``config.trainable_tokens``): which rows "auto" picks, how a bad
value is refused, and what training them does to the saved adapter and to the base."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer.helpers import (
    QA,
    assert_base_unchanged,
    assert_lora_trained,
    quick_config,
    snapshot_base,
    write_jsonl,
)
from trainer import cli
from trainer.base_model import load_base_model, stop_token_ids
from trainer.common import CARD_NAME
from trainer.config import MAX_TRAINABLE_TOKENS, ConfigError
from trainer.data import load_jsonl, tokenize_sft
from trainer.dpo import DPOJobConfig, run_dpo
from trainer.sft import SFTJobConfig, run_sft
from trainer.tokens import check_trainable_tokens, explicit_ids, resolve_trainable_tokens

DELTA_KEY = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"


def resolve(spec, tokenizer, data_path, task="sft", stops=None):
    examples = load_jsonl(data_path, task).examples
    if stops is None:
        stops = stop_token_ids(tokenizer, None)
    return resolve_trainable_tokens(
        spec, tokenizer, stop_token_ids=stops, examples=examples, model_vocab_size=len(tokenizer)
    )


def end_of_turn(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids("<end_of_turn>")


# --------------------------------------------------------------------------- resolving


def test_auto_picks_the_end_of_turn_token_that_chat_data_trains(tiny_tokenizer, sft_data):
    tokens = resolve("auto", tiny_tokenizer, sft_data)
    assert tokens.ids == [end_of_turn(tiny_tokenizer)]
    assert tokens.tokens == ["<end_of_turn>"]
    # <eos> is a stop token too, but chat data never puts it in the loss
    assert tiny_tokenizer.eos_token_id in stop_token_ids(tiny_tokenizer, None)
    assert "'<end_of_turn>'" in tokens.describe() and "auto" in tokens.describe()


def test_auto_follows_the_data(tiny_tokenizer, dpo_data, tmp_path):
    # DPO answers are chat turns: <end_of_turn> again
    assert resolve("auto", tiny_tokenizer, dpo_data, "dpo").tokens == ["<end_of_turn>"]
    # plain prompt/completion text ends each completion with the tokenizer's eos
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": q, "completion": a} for q, a in QA])
    assert resolve("auto", tiny_tokenizer, plain).tokens == ["<eos>"]
    # no stop token carries loss: nothing to train, a plain LoRA
    tokens = resolve("auto", tiny_tokenizer, plain, stops=[end_of_turn(tiny_tokenizer)])
    assert tokens.ids == [] and "plain LoRA" in tokens.describe()


def test_explicit_tokens_and_none(tiny_tokenizer, sft_data):
    eot = end_of_turn(tiny_tokenizer)
    tokens = resolve(["<end_of_turn>", 7, eot], tiny_tokenizer, sft_data)
    assert tokens.ids == [eot, 7]  # in order, duplicates dropped
    assert tokens.tokens[0] == "<end_of_turn>"
    assert resolve("none", tiny_tokenizer, sft_data).ids == []


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        (["<no_such_token>"], "is not a token of this tokenizer"),
        (["Paris is"], "is not a token of this tokenizer"),
        ([10**6], "out of range"),
    ],
)
def test_tokens_the_model_lacks_are_a_config_error(tiny_tokenizer, tiny_model_dir, spec, needle):
    with pytest.raises(ConfigError, match=needle) as info:
        explicit_ids(spec, tiny_tokenizer, len(tiny_tokenizer))
    assert info.value.field == "trainable_tokens"
    # the same check, from the model folder alone (what the server and the CLI run first)
    with pytest.raises(ConfigError, match=needle):
        check_trainable_tokens(spec, tiny_model_dir)
    check_trainable_tokens(["<end_of_turn>"], tiny_model_dir)


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("all", "'auto', 'none' or a list"),
        ([], "non-empty list"),
        (5, "non-empty list"),
        ([-1], "negative"),
        ([1.5], "token string or an integer id"),
        ([""], "token string or an integer id"),
        ([True], "token string or an integer id"),
        (list(range(MAX_TRAINABLE_TOKENS + 1)), f"at most {MAX_TRAINABLE_TOKENS}"),
    ],
)
def test_config_checks_the_shape_of_trainable_tokens(value, needle):
    with pytest.raises(ConfigError, match=needle) as info:
        SFTJobConfig(trainable_tokens=value)
    assert info.value.field == "trainable_tokens"
    assert str(info.value).startswith("trainable_tokens:")


def test_config_default_and_round_trip():
    assert SFTJobConfig().trainable_tokens == "auto"
    config = DPOJobConfig.from_dict({"trainable_tokens": ["<end_of_turn>", 1]})
    assert DPOJobConfig.from_dict(config.to_dict()) == config


def test_cli_flag_and_dry_run(tiny_model_dir, sft_data, capsys):
    assert cli.parse_trainable_tokens("auto") == "auto"
    assert cli.parse_trainable_tokens(" none ") == "none"
    assert cli.parse_trainable_tokens("<end_of_turn>, 106,<eos>") == ["<end_of_turn>", 106, "<eos>"]
    base = ["train", "sft", "--data", str(sft_data), "--name", "x", "--base", str(tiny_model_dir)]
    assert cli.main([*base, "--dry-run"]) == 0
    assert "trainable tokens (auto: stop tokens that carry loss): '<end_of_turn>'" in (
        capsys.readouterr().out
    )
    assert cli.main([*base, "--dry-run", "--trainable-tokens", "none"]) == 0
    assert "trainable tokens: none" in capsys.readouterr().out
    assert cli.main([*base, "--dry-run", "--trainable-tokens", "<nope>"]) == 2
    assert "trainable_tokens: '<nope>' is not a token" in capsys.readouterr().err
    # training refuses it before the base model is loaded
    assert cli.main([*base, "--trainable-tokens", "99999", "--max-steps", "1"]) == 2
    assert "out of range" in capsys.readouterr().err


# --------------------------------------------------------------------------- training


def saved(out):
    return load_file(str(out / "adapter_model.safetensors")), json.loads(
        (out / "adapter_config.json").read_text()
    )


def test_sft_trains_only_the_token_rows_on_an_untied_model(tiny_model_dir, sft_data, tmp_path):
    base = load_base_model(tiny_model_dir, quantization="none", device="cpu")
    snapshot = snapshot_base(base.model)
    eot = end_of_turn(base.tokenizer)
    row_before = base.model.get_input_embeddings().weight[eot].detach().clone()
    out = tmp_path / "adapter"

    result = run_sft(quick_config(SFTJobConfig, tiny_model_dir), sft_data, out, base=base)

    assert_base_unchanged(snapshot)  # the embedding and the output layer included
    assert_lora_trained(out)
    tensors, adapter_config = saved(out)
    assert adapter_config["trainable_token_indices"] == [eot]
    # one row of the input embedding: its new values, not a difference
    delta = tensors[DELTA_KEY]
    assert delta.shape == (1, row_before.shape[0])
    assert not torch.allclose(delta[0], row_before, atol=1e-3)
    # untied: PEFT leaves the output layer alone and saves nothing for it
    assert not any("lm_head" in k for k in tensors)
    trainable = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert [n for n in trainable if "lora_" not in n] == [
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default"
    ]
    card = json.loads((out / CARD_NAME).read_text())
    assert card["hyperparameters"]["trainable_tokens"] == "auto"
    assert card["hyperparameters"]["trainable_token_ids"] == [eot]
    assert card["hyperparameters"]["trainable_token_strings"] == ["<end_of_turn>"]
    assert card["lora"]["trainable_token_indices"] == [eot]


def test_none_gives_a_plain_lora(tiny_model_dir, sft_data, tmp_path):
    out = tmp_path / "plain"
    config = quick_config(SFTJobConfig, tiny_model_dir, trainable_tokens="none", max_steps=2)
    run_sft(config, sft_data, out)
    tensors, adapter_config = saved(out)
    assert adapter_config["trainable_token_indices"] is None
    assert all("lora_" in k for k in tensors), sorted(tensors)
    card = json.loads((out / CARD_NAME).read_text())
    assert card["hyperparameters"]["trainable_token_ids"] == []


def batch_of(tokenizer, data_path):
    seq = tokenize_sft(load_jsonl(data_path, "sft").examples[0], tokenizer)
    return torch.tensor([seq.input_ids]), torch.tensor([seq.labels])


def test_tied_qlora_sft_trains_rows_the_output_layer_shares(
    tiny_tied_model_dir, sft_data, tmp_path
):
    """The bundled model's case: NF4 base, tied embeddings. PEFT wraps the output layer with
    the same rows, and TRL's fused loss head must see them (it reads ``.weight``)."""
    base = load_base_model(tiny_tied_model_dir, quantization="nf4", device="cpu")
    snapshot = snapshot_base(base.model)
    eot = end_of_turn(base.tokenizer)
    row_before = base.model.get_input_embeddings().weight[eot].detach().float().clone()
    out = tmp_path / "tied"

    config = quick_config(SFTJobConfig, tiny_tied_model_dir, quantization="nf4")
    result = run_sft(config, sft_data, out, base=base)

    assert_base_unchanged(snapshot)
    tensors, adapter_config = saved(out)
    assert adapter_config["trainable_token_indices"] == [eot]
    delta = tensors[DELTA_KEY]
    assert delta.shape == (1, row_before.shape[0])
    assert not torch.allclose(delta[0].float(), row_before, atol=1e-3)
    # the tied output layer is not saved separately: it follows the embedding's rows
    assert [k for k in tensors if "lora_" not in k] == [DELTA_KEY]

    model = result.model.eval()
    head = model.get_output_embeddings()
    assert torch.equal(head.weight[eot].float(), delta[0].float())
    ids, labels = batch_of(base.tokenizer, sft_data)
    with torch.no_grad():
        fused = model(input_ids=ids, labels=labels, fused_lm_head=True).loss
        plain = model(input_ids=ids, labels=labels).loss
    # training's loss (fused head) and the model's own forward (serving) agree
    assert fused.item() == pytest.approx(plain.item(), rel=1e-4)


def test_disabled_adapter_is_the_base_on_a_tied_model(tiny_tied_model_dir, sft_data, tmp_path):
    """Eval's base arm and DPO's reference run with the adapter disabled: the trained rows
    must then be gone from both the embedding and the output layer."""
    base = load_base_model(tiny_tied_model_dir, quantization="none", device="cpu")
    ids, _ = batch_of(base.tokenizer, sft_data)
    with torch.no_grad():
        before = base.model(input_ids=ids).logits.clone()
    result = run_sft(
        quick_config(SFTJobConfig, tiny_tied_model_dir), sft_data, tmp_path / "a", base=base
    )
    model = result.model.eval()
    with torch.no_grad(), model.disable_adapter():
        disabled = model(input_ids=ids).logits
    with torch.no_grad():
        enabled = model(input_ids=ids).logits
    assert torch.allclose(disabled, before, atol=1e-5)
    assert not torch.allclose(enabled, before, atol=1e-3)


def test_tied_qlora_dpo_trains_the_token_rows(tiny_tied_model_dir, dpo_data, tmp_path):
    base = load_base_model(tiny_tied_model_dir, quantization="nf4", device="cpu")
    snapshot = snapshot_base(base.model)
    eot = end_of_turn(base.tokenizer)
    row_before = base.model.get_input_embeddings().weight[eot].detach().float().clone()
    out = tmp_path / "dpo"

    config = quick_config(DPOJobConfig, tiny_tied_model_dir, quantization="nf4")
    result = run_dpo(config, dpo_data, out, base=base)

    assert_base_unchanged(snapshot)
    # the reference is the base (adapter and token rows disabled): log 2 at the first step
    assert result.loss_history[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    tensors, adapter_config = saved(out)
    assert adapter_config["trainable_token_indices"] == [eot]
    assert not torch.allclose(tensors[DELTA_KEY][0].float(), row_before, atol=1e-3)
    assert result.card["hyperparameters"]["trainable_token_strings"] == ["<end_of_turn>"]
