"""The shared base-model loader, on the tiny model (the bundled one is covered by the
integration tests)."""

import json
import shutil

import pytest

from trainer.base_model import (
    GEMMA_CHAT_TEMPLATE,
    BaseModelError,
    load_base_model,
    model_fingerprint,
    resolve_base_model,
)


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_loads_tiny_model(tiny_model_path, quantization):
    loaded = load_base_model(tiny_model_path, quantization=quantization, device="cpu")
    assert loaded.quantization == quantization
    assert loaded.device == "cpu"
    assert loaded.tokenizer.convert_tokens_to_ids("<end_of_turn>") in loaded.stop_token_ids
    assert loaded.tokenizer.eos_token_id in loaded.stop_token_ids
    if quantization == "nf4":
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.model.modules())


def test_nf4_inference_forward_works_for_every_layer_shape(tiny_model_path):
    """The tiny model has layers whose output size is not a multiple of 32; on a CPU with
    AVX512-BF16 bitsandbytes would repack those for its fast kernel and fail. Greedy
    no-grad forwards, twice (the second sees the repacked weights), must run and agree."""
    import torch

    loaded = load_base_model(tiny_model_path, quantization="nf4", device="cpu")
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    with torch.inference_mode():
        first = loaded.model(input_ids=ids).logits
        second = loaded.model(input_ids=ids).logits
    assert torch.isfinite(first).all()
    assert torch.equal(first.argmax(-1), second.argmax(-1))


def test_nf4_is_smaller_than_unquantized(tiny_model_path):
    full = load_base_model(tiny_model_path, quantization="none", device="cpu")
    nf4 = load_base_model(tiny_model_path, quantization="nf4", device="cpu")
    assert nf4.memory_bytes < full.memory_bytes / 2


def test_gemma_template_is_supplied_and_folds_system(tiny_model_path):
    loaded = load_base_model(tiny_model_path, quantization="none", device="cpu")
    assert loaded.tokenizer.chat_template == GEMMA_CHAT_TEMPLATE
    text = loaded.tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(BaseModelError, match="never downloads"):
        resolve_base_model(str(tmp_path / "nope"))
    with pytest.raises(BaseModelError, match="never downloads"):
        resolve_base_model("google/gemma-3-270m")  # a hub id is not fetched


def test_folder_without_config_or_with_pickles_is_refused(tmp_path, tiny_model_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseModelError, match="config.json"):
        resolve_base_model(str(tmp_path / "empty"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_model_path / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(BaseModelError, match="safetensors"):
        resolve_base_model(str(pickled))


def test_fingerprint_follows_architecture(tmp_path, tiny_model_path):
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((tiny_model_path / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config))
    assert model_fingerprint(other) == model_fingerprint(tiny_model_path)
    config["hidden_size"] = 128
    (other / "config.json").write_text(json.dumps(config))
    assert model_fingerprint(other) != model_fingerprint(tiny_model_path)
