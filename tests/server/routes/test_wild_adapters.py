"""Adapters from the wild (tests/wild_adapters.py) through the real server: every folder as
PEFT versions, TRL, Unsloth, LLaMA-Factory and Axolotl write it registers and serves PEFT's
tokens; the base name is judged by what the tensors prove; every adapter for another base
is still refused, by shapes or, when the shapes fit, by a name known to differ; a file
holding tensors the server would not apply is refused naming them."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import httpx
import pytest
import torch

from server.adapter_validation import AdapterError, validate_adapter_dir
from server.engine.kinds.base import BaseModelShape
from tests.support import peft_greedy, start_live_server
from tests.tiny_model import build_lora_adapter, build_tiny_model
from tests.wild_adapters import CASES, build_wild_adapters

PROMPT = "Hello world, this is"


@pytest.fixture(scope="module")
def wild(tiny_model_path, tmp_path_factory):
    return build_wild_adapters(tiny_model_path, tmp_path_factory.mktemp("wild"))


@pytest.fixture(scope="module")
def server(tiny_model_path, tmp_path_factory):
    data = tmp_path_factory.mktemp("wild-data")
    server = start_live_server(
        base_model=str(tiny_model_path),
        quantization="none",
        max_model_len=128,
        default_max_tokens=8,
        data_dir=data,
        max_loras=4,
    )
    server.data_dir = data
    yield server
    server.stop()


@pytest.fixture(scope="module")
def prompt_ids(tiny_model_path) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)(PROMPT)["input_ids"]


def register(server, name, path):
    return httpx.post(f"{server.url}/adapters", json={"name": name, "path": str(path)}, timeout=60)


def served_text(server, model: str) -> str:
    r = server.openai().completions.create(
        model=model, prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    return r.choices[0].text


def decoded(model_path, ids: list[int]) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path).decode(ids, skip_special_tokens=True)


EXPECTED_BASE_CHECK = {
    "peft-hub-base": "unverified",
    "peft-local-base": "unverified",
    "peft-hf-cache-base": "unverified",
    "peft-no-base-name": "none",
    "unsloth": "unverified",
    "llamafactory": "unverified",
    "axolotl": "unverified",
}


@pytest.mark.parametrize("case", CASES)
def test_wild_adapter_registers_and_serves_as_peft(
    case, wild, server, tiny_model_path, prompt_ids, caplog
):
    adapter = wild[case]
    r = register(server, case, adapter.path)
    assert r.status_code == 201, f"{adapter.tool}: {r.text}"
    info = r.json()
    assert info["kind"] == "lora"
    check = info["base_check"]
    assert check["status"] == EXPECTED_BASE_CHECK.get(case, "matches"), check
    if check["status"] == "unverified":
        assert "can judge" in check["detail"]
        assert httpx.get(f"{server.url}/adapters/{case}").json()["base_check"] == check
    # PEFT's own greedy tokens for the same tensors (its canonical folder)
    want = peft_greedy(tiny_model_path, adapter.reference, prompt_ids, 8)
    assert want != peft_greedy(tiny_model_path, None, prompt_ids, 8)  # the adapter matters
    assert served_text(server, case) == decoded(tiny_model_path, want), adapter.tool
    assert httpx.delete(f"{server.url}/adapters/{case}").status_code == 200


def test_training_pickles_beside_the_adapter_are_not_stored(server, wild):
    r = register(server, "lf", wild["llamafactory"].path)
    assert r.status_code == 201, r.text
    stored = Path(r.json()["path"])
    assert (stored / "adapter_model.safetensors").is_file()
    assert not (stored / "training_args.bin").exists()  # never read, never kept
    assert httpx.delete(f"{server.url}/adapters/lf").status_code == 200


def test_an_uploaded_training_output_with_checkpoints_registers(
    server, wild, tiny_model_path, prompt_ids
):
    """Axolotl's output folder holds checkpoint-N/ copies of the adapter: the upload takes
    the adapter beside the shallowest adapter_config.json."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(wild["axolotl"].path, arcname="outputs/lora-out")
    r = httpx.post(
        f"{server.url}/adapters",
        data={"name": "axo-upload"},
        files={"file": ("lora-out.tar.gz", buf.getvalue())},
        timeout=60,
    )
    assert r.status_code == 201, r.text
    want = peft_greedy(tiny_model_path, wild["axolotl"].reference, prompt_ids, 8)
    assert served_text(server, "axo-upload") == decoded(tiny_model_path, want)
    assert httpx.delete(f"{server.url}/adapters/axo-upload").status_code == 200


# --- still refused: adapters for another base ------------------------------------------------


def snapshot(server):
    index = (server.data_dir / "adapters" / "registry.json").read_text()
    stored = sorted(p.name for p in (server.data_dir / "adapters" / "store").iterdir())
    return index, stored


def assert_refused(server, path, code, *named):
    before = snapshot(server)
    r = register(server, "other", path)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    for text in named:
        assert text in err["message"], err["message"]
    assert snapshot(server) == before
    return err


def _other_base(tmp: Path, **config_changes) -> Path:
    """A tiny base like the served one but for the given config changes (random weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = build_tiny_model(tmp, seed=3)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(config_changes)
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "model.safetensors").unlink()
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)).save_pretrained(path)
    return path


def test_adapters_for_another_base_are_still_refused(server, tmp_path, wild):
    # same module names, other shapes: the tensors tell, whatever the name says
    wide = build_lora_adapter(_other_base(tmp_path / "wide", intermediate_size=96), tmp_path / "w")
    cfg = json.loads((wide / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "/data/models/adapters"  # a name nobody can judge
    (wide / "adapter_config.json").write_text(json.dumps(cfg))
    assert_refused(server, wide, "base_model_mismatch", "do not fit the base layer")
    # more layers than the base: modules the base does not have
    deep = build_lora_adapter(_other_base(tmp_path / "deep", num_hidden_layers=3,
                              layer_types=["sliding_attention", "full_attention", "full_attention"]),
                              tmp_path / "d")  # fmt: skip
    assert_refused(server, deep, "base_model_mismatch", "model.layers.2")
    # tensors that fit, a name known to differ (a Llama with hidden size 2048, 16 layers)
    named = tmp_path / "named"
    shutil.copytree(wild["peft-target-list"].path, named)
    cfg = json.loads((named / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "unsloth/Llama-3.2-1B-Instruct-bnb-4bit"
    (named / "adapter_config.json").write_text(json.dumps(cfg))
    assert_refused(server, named, "base_model_mismatch", "Llama-3.2-1B", "hidden size 2048")


def test_bias_all_with_trained_biases_and_an_output_layer_is_refused_naming_them(
    server, wild, tmp_path
):
    """The mirror defect: bias "all", a trained q_proj.bias and an lm_head.weight in the
    file. Served without them it would not be the trained adapter: a 400 names each."""
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bias-all"
    shutil.copytree(wild["peft-all-linear"].path, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["bias"] = "all"
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    q_bias = "base_model.model.model.layers.0.self_attn.q_proj.bias"
    head = "base_model.model.lm_head.weight"
    vocab = server.app.state.engine.info.vocab_size
    tensors[q_bias] = torch.randn(64)
    tensors[head] = torch.randn(vocab, 64)
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    err = assert_refused(server, bad, "unsupported_adapter", q_bias, head)
    assert "bias" in err["message"] and "differs from the base" in err["message"]


def test_a_restated_output_layer_equal_to_the_base_is_served(
    server, wild, tmp_path, tiny_model_path
):
    """PEFT saves the base's embedding and output layer whole when one is a LoRA target
    (save_embedding_layers): equal to the base's, they are applied by being it; changed,
    they are refused by name."""
    from safetensors.torch import load_file, save_file

    adapter = wild["peft-lm-head-and-embedding"].path
    keys = load_file(str(adapter / "adapter_model.safetensors"))
    assert any(k.endswith("lm_head.base_layer.weight") for k in keys)
    assert any("lora_embedding_A" in k for k in keys)
    changed = tmp_path / "changed-head"
    shutil.copytree(adapter, changed)
    tensors = load_file(str(changed / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("lm_head.base_layer.weight"))
    tensors[key] = tensors[key] + 0.01
    save_file(tensors, str(changed / "adapter_model.safetensors"))
    assert_refused(server, changed, "unsupported_adapter", key, "differs from the base")


def test_vllm_route_answers_404_for_a_path_that_does_not_exist(server, tmp_path):
    before = snapshot(server)
    r = httpx.post(
        f"{server.url}/v1/load_lora_adapter",
        json={"lora_name": "ghost", "lora_path": str(tmp_path / "nowhere")},
    )
    assert r.status_code == 404, r.text
    assert "No adapter found" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "lora_path"
    assert snapshot(server) == before


# --- names judged against a base of Gemma 3 270M's shape (file inspection only) ------------


def _gemma_270m_shape(names: set[str]) -> BaseModelShape:
    linear = {}
    for layer in range(18):
        prefix = f"model.layers.{layer}"
        linear[f"{prefix}.self_attn.q_proj"] = (640, 1024)
        linear[f"{prefix}.self_attn.v_proj"] = (640, 256)
    return BaseModelShape(
        linear=linear,
        token_modules={"model.embed_tokens": (262144, 640), "lm_head": (262144, 640)},
        model_type="gemma3_text",
        hidden_size=640,
        num_layers=18,
        num_kv_heads=1,
        head_dim=256,
        vocab_size=262144,
        max_model_len=4096,
        names=frozenset(names),
    )


def _header_only_adapter(path: Path, base_name: str) -> Path:
    from safetensors.torch import save_file

    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["q_proj"],
        "base_model_name_or_path": base_name,
    }))  # fmt: skip
    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(1, 640),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(1024, 1),
        },
        str(path / "adapter_model.safetensors"),
    )
    return path


@pytest.mark.parametrize(
    ("base_name", "served_names", "status"),
    [
        ("google/gemma-3-270m", {"gemma-3-270m"}, "matches"),
        ("unsloth/gemma-3-270m-unsloth-bnb-4bit", {"gemma-3-270m"}, "matches"),
        ("/data/models/gemma-3-270m", {"gemma-3-270m"}, "matches"),
        ("/data/models/adapters", {"gemma-3-270m"}, "unverified"),
        ("google/gemma-3-270m-it", {"my-local-copy"}, "same_architecture"),
        ("google/gemma-3-270m-it", {"gemma-3-270m"}, "refused"),
        ("google/gemma-3-1b-it", {"my-local-copy"}, "refused"),
        ("meta-llama/Llama-3.1-8B", {"gemma-3-270m"}, "refused"),
    ],
)
def test_base_names_are_judged_after_the_tensors(tmp_path, base_name, served_names, status):
    path = _header_only_adapter(tmp_path / "a", base_name)
    base = _gemma_270m_shape(served_names)
    if status == "refused":
        with pytest.raises(AdapterError) as info:
            validate_adapter_dir(path, base=base, max_rank=64, max_bytes=10**8)
        assert info.value.code == "base_model_mismatch"
        assert base_name in info.value.message
        return
    spec = validate_adapter_dir(path, base=base, max_rank=64, max_bytes=10**8)
    assert spec.base_check["status"] == status
