"""The adapter lifecycle on the tiny model, through the real server and the `openai` SDK:
register several, mixed batches, eviction under pressure, unload, restart, bad adapters."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import tarfile
import time
import zipfile
from pathlib import Path

import httpx
import openai
import pytest

from tests.support import start_live_server
from tests.tiny_model import build_lora_adapter, build_tiny_model

PROMPT = "Hello world, this is"


@pytest.fixture(scope="module")
def adapters(tiny_model_path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    made = {f"a{i}": build_lora_adapter(tiny_model_path, root / f"a{i}", seed=i) for i in range(4)}
    made["attn-only"] = build_lora_adapter(
        tiny_model_path, root / "attn-only", seed=9, target_modules=["q_proj", "v_proj"]
    )
    return made


@pytest.fixture(scope="module")
def server(tiny_model_path, tmp_path_factory):
    data = tmp_path_factory.mktemp("adapter-data")
    server = start_live_server(
        base_model=str(tiny_model_path),
        quantization="none",
        max_model_len=256,
        default_max_tokens=16,
        data_dir=data,
        max_loras=2,
        max_cpu_loras=4,
        max_lora_rank=8,
        max_adapter_bytes=256 * 1024,
    )
    server.data_dir = data
    yield server
    server.stop()


def register(server, name, path, **extra):
    return httpx.post(
        f"{server.url}/adapters", json={"name": name, "path": str(path), **extra}, timeout=60
    )


def names(server) -> list[str]:
    return [a["name"] for a in httpx.get(f"{server.url}/adapters").json()["data"]]


def greedy(server, model, max_tokens=12, prompt=PROMPT):
    r = server.openai().completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    return r.choices[0].text


def test_register_list_describe_and_models(server, adapters):
    for name in ("a0", "a1"):
        r = register(server, name, adapters[name])
        assert r.status_code == 201, r.text
        info = r.json()
        assert info["name"] == name and info["rank"] == 4 and info["parent"] == "base"
        assert info["location"] == "device"
        assert len(info["target_modules"]) == 14
    assert {"a0", "a1"} <= set(names(server))
    one = httpx.get(f"{server.url}/adapters/a0").json()
    assert one["size_bytes"] > 0 and one["load_count"] >= 1
    # wall-clock time (Unix seconds), not the process's monotonic clock
    assert abs(one["last_used"] - time.time()) < 3600, one["last_used"]
    models = {m.id: m for m in server.openai().models.list().data}
    assert models["a0"].parent == "base"
    assert Path(models["a0"].root).is_dir()


def test_adapters_change_behaviour_and_batch_together(server, adapters):
    solo = {m: greedy(server, m) for m in ("base", "a0", "a1")}
    assert len(set(solo.values())) == 3, solo  # each adapter really answers differently

    async def together():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        jobs = [
            client.completions.create(
                model=m,
                prompt=PROMPT,
                max_tokens=12,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            for m in ("base", "a0", "a1", "a0", "a1", "base")
        ]
        return await asyncio.gather(*jobs)

    engine = server.app.state.engine
    engine.scheduler.stats.peak_batch_size = 0
    results = asyncio.run(together())
    for model, r in zip(("base", "a0", "a1", "a0", "a1", "base"), results, strict=True):
        assert r.choices[0].text == solo[model], f"{model} diverged in a mixed batch"
    assert engine.scheduler.stats.peak_batch_size >= 2


def test_trained_token_rows_are_served_as_peft_generates(server, tiny_model_path, tmp_path):
    """An adapter that trained the end-of-turn and eos rows (PEFT trainable_token_indices)
    is registered, says so, and generates PEFT's greedy tokens, alone and beside others."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    eos, eot = tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")
    path = build_lora_adapter(
        tiny_model_path,
        tmp_path / "rows",
        seed=7,
        trainable_token_indices={"embed_tokens": [eot, eos], "lm_head": [eot]},
    )
    r = register(server, "rows", path)
    assert r.status_code == 201, r.text
    assert r.json()["trained_tokens"] == sorted([eot, eos])

    prompt = "Hello<end_of_turn> world, this"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    assert eot in ids[0].tolist()  # the trained row is in the prompt
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), path)
    with torch.inference_mode():
        out = model.eval().generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None)
    expected = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert greedy(server, "rows", prompt=prompt) == expected

    async def together():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        jobs = [
            client.completions.create(model=m, prompt=prompt, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
            for m in ("rows", "base", "rows")
        ]  # fmt: skip
        return await asyncio.gather(*jobs)

    rows, base, again = asyncio.run(together())
    assert rows.choices[0].text == again.choices[0].text == expected
    assert base.choices[0].text == greedy(server, "base", prompt=prompt) != expected
    assert httpx.delete(f"{server.url}/adapters/rows").status_code == 200


def test_unknown_adapter_is_404_never_the_base(server):
    with pytest.raises(openai.NotFoundError) as info:
        server.openai().chat.completions.create(
            model="not-registered", messages=[{"role": "user", "content": "hi"}]
        )
    assert info.value.body["param"] == "model"


def test_eviction_under_pressure_serves_every_request(server, adapters):
    for name in ("a2", "a3"):
        assert register(server, name, adapters[name]).status_code == 201
    registry = server.app.state.adapters
    assert registry.loaded_count() <= 2  # max_loras
    solo = {m: greedy(server, m, max_tokens=6) for m in ("a0", "a1", "a2", "a3")}

    async def storm():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        order = ["a0", "a1", "a2", "a3"] * 3
        jobs = [
            client.completions.create(
                model=m, prompt=PROMPT, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
            )
            for m in order
        ]
        return order, await asyncio.gather(*jobs)

    before = sum(registry.states[n].evict_count for n in solo)
    order, results = asyncio.run(storm())
    for model, r in zip(order, results, strict=True):
        assert r.choices[0].text == solo[model]
    assert sum(registry.states[n].evict_count for n in solo) > before
    assert registry.loaded_count() <= 2
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'swapserve_adapter_events_total{adapter="a2",event="evicted"}' in metrics or (
        'swapserve_adapter_events_total{adapter="a0",event="evicted"}' in metrics
    )
    assert 'swapserve_requests_total{endpoint="completions",model="a3",outcome="ok"}' in metrics
    where = {a["name"]: a["location"] for a in httpx.get(f"{server.url}/adapters").json()["data"]}
    assert list(where.values()).count("device") <= 2
    assert "host" in where.values()  # evicted from the device, kept in host memory
    # a fifth adapter pushes the least recently used one out of memory altogether
    assert register(server, "fifth", adapters["attn-only"]).status_code == 201
    where = {a["name"]: a["location"] for a in httpx.get(f"{server.url}/adapters").json()["data"]}
    assert list(where.values()).count("disk") == 1
    disk = next(n for n, loc in where.items() if loc == "disk")
    assert greedy(server, disk, max_tokens=6) == solo[disk]  # back from disk, same answer
    httpx.delete(f"{server.url}/adapters/fifth")


def test_delete_removes_files_and_record(server, adapters):
    assert register(server, "temp", adapters["attn-only"]).status_code == 201
    stored = Path(httpx.get(f"{server.url}/adapters/temp").json()["path"])
    assert stored.is_dir()
    r = httpx.delete(f"{server.url}/adapters/temp")
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert "temp" not in names(server)
    assert not stored.exists()
    index = json.loads((server.data_dir / "adapters" / "registry.json").read_text())
    assert "temp" not in index["adapters"]
    assert httpx.delete(f"{server.url}/adapters/temp").status_code == 404
    with pytest.raises(openai.NotFoundError):
        greedy(server, "temp")


def test_vllm_routes(server, adapters):
    url = server.url
    r = httpx.post(
        f"{url}/v1/load_lora_adapter", json={"lora_name": "vl", "lora_path": str(adapters["a0"])}
    )
    assert r.status_code == 200
    assert r.text == "Success: LoRA adapter 'vl' added successfully."
    assert greedy(server, "vl") == greedy(server, "a0")
    r = httpx.post(
        f"{url}/v1/load_lora_adapter", json={"lora_name": "vl", "lora_path": str(adapters["a1"])}
    )
    assert r.status_code == 409
    r = httpx.post(
        f"{url}/v1/load_lora_adapter",
        json={"lora_name": "vl", "lora_path": str(adapters["a1"]), "load_inplace": True},
    )
    assert r.status_code == 200
    assert greedy(server, "vl") == greedy(server, "a1")
    r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "vl"})
    assert r.status_code == 200 and "removed" in r.text
    r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "vl"})
    assert r.status_code == 404
    assert "cannot be found" in r.json()["error"]["message"]


def _tar(folder: Path, arcname: str = "adapter") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(folder, arcname=arcname)
    return buf.getvalue()


def _zip(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in folder.iterdir():
            zf.write(f, f"adapter/{f.name}")
    return buf.getvalue()


def upload(server, name, filename, data, **form):
    return httpx.post(
        f"{server.url}/adapters",
        data={"name": name, **form},
        files={"file": (filename, data)},
        timeout=60,
    )


def test_upload_tar_and_zip(server, adapters):
    r = upload(server, "up-tar", "a0.tar.gz", _tar(adapters["a0"]))
    assert r.status_code == 201, r.text
    r = upload(server, "up-zip", "a0.zip", _zip(adapters["a0"]))
    assert r.status_code == 201, r.text
    assert greedy(server, "up-tar") == greedy(server, "up-zip") == greedy(server, "a0")
    for name in ("up-tar", "up-zip"):
        httpx.delete(f"{server.url}/adapters/{name}")


# --- every bad adapter: a specific 4xx, the error shape, nothing changed ---------------------


def copy_adapter(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def snapshot(server):
    index = (server.data_dir / "adapters" / "registry.json").read_text()
    stored = sorted(p.name for p in (server.data_dir / "adapters" / "store").iterdir())
    return names(server), index, stored


def assert_refused(server, response, status, code):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code, err
    return err


@pytest.fixture
def unchanged(server):
    before = snapshot(server)
    yield
    assert snapshot(server) == before, "a refused adapter changed the registry"
    leftovers = list((server.data_dir / "adapters" / ".staging").iterdir())
    assert not leftovers


def test_missing_and_unparsable_config(server, adapters, tmp_path, unchanged):
    bad = copy_adapter(adapters["a0"], tmp_path / "noconf")
    (bad / "adapter_config.json").unlink()
    assert_refused(server, register(server, "bad", bad), 400, "invalid_config")
    bad = copy_adapter(adapters["a0"], tmp_path / "garbled")
    (bad / "adapter_config.json").write_text("{ not json")
    assert_refused(server, register(server, "bad", bad), 400, "invalid_config")


def test_pickled_or_missing_weights(server, adapters, tmp_path, unchanged):
    bad = copy_adapter(adapters["a0"], tmp_path / "pickled")
    (bad / "adapter_model.safetensors").rename(bad / "adapter_model.bin")
    err = assert_refused(server, register(server, "bad", bad), 400, "unsafe_weights")
    assert "unpickle" in err["message"]
    bad = copy_adapter(adapters["a0"], tmp_path / "noweights")
    (bad / "adapter_model.safetensors").unlink()
    assert_refused(server, register(server, "bad", bad), 400, "invalid_weights")
    bad = copy_adapter(adapters["a0"], tmp_path / "garbage")
    (bad / "adapter_model.safetensors").write_bytes(b"\x00" * 20)
    assert_refused(server, register(server, "bad", bad), 400, "invalid_weights")


def test_base_model_mismatch_by_shape_and_by_name(server, adapters, tmp_path, unchanged):
    other_base = build_tiny_model(tmp_path / "other-base", seed=3)
    cfg = json.loads((other_base / "config.json").read_text())
    cfg["intermediate_size"] = 96  # same names, other shapes
    (other_base / "config.json").write_text(json.dumps(cfg))
    (other_base / "model.safetensors").unlink()
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(other_base)).save_pretrained(
        other_base
    )
    wrong = build_lora_adapter(other_base, tmp_path / "wrong-shape", seed=2)
    cfg = json.loads((wrong / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None  # only the shapes can tell
    (wrong / "adapter_config.json").write_text(json.dumps(cfg))
    err = assert_refused(server, register(server, "bad", wrong), 400, "base_model_mismatch")
    assert "in," in err["message"] or "shapes" in err["message"]
    named = copy_adapter(adapters["a0"], tmp_path / "named")
    cfg = json.loads((named / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-3.1-8B"
    (named / "adapter_config.json").write_text(json.dumps(cfg))
    assert_refused(server, register(server, "bad", named), 400, "base_model_mismatch")


def test_zero_matched_modules(server, adapters, tmp_path, unchanged):
    from safetensors.torch import load_file, save_file

    bad = copy_adapter(adapters["a0"], tmp_path / "nomatch")
    tensors = load_file(bad / "adapter_model.safetensors")
    renamed = {
        k.replace("self_attn", "attention").replace("mlp", "ffn"): v for k, v in tensors.items()
    }
    save_file(renamed, bad / "adapter_model.safetensors")
    err = assert_refused(server, register(server, "bad", bad), 400, "no_matching_modules")
    assert "none of" in err["message"]


def test_rank_above_maximum(server, tiny_model_path, tmp_path, unchanged):
    big = build_lora_adapter(tiny_model_path, tmp_path / "r16", r=16)
    err = assert_refused(server, register(server, "bad", big), 400, "rank_too_high")
    assert "max_lora_rank 8" in err["message"]


def test_dora_modules_to_save_and_lora_bias_are_refused_with_a_reason(
    server, tiny_model_path, tmp_path, unchanged
):
    dora = build_lora_adapter(tiny_model_path, tmp_path / "dora", use_dora=True)
    err = assert_refused(server, register(server, "bad", dora), 400, "unsupported_adapter")
    assert "DoRA" in err["message"]
    mts = copy_adapter(dora, tmp_path / "mts")
    cfg = json.loads((mts / "adapter_config.json").read_text())
    cfg.update(use_dora=False, modules_to_save=["lm_head"])
    (mts / "adapter_config.json").write_text(json.dumps(cfg))
    err = assert_refused(server, register(server, "bad", mts), 400, "unsupported_adapter")
    assert "modules_to_save" in err["message"]
    bias = build_lora_adapter(tiny_model_path, tmp_path / "bias", lora_bias=True)
    err = assert_refused(server, register(server, "bad", bias), 400, "unsupported_adapter")
    assert "lora_bias" in err["message"]


def test_taken_and_unsafe_names(server, adapters, unchanged):
    assert_refused(server, register(server, "a0", adapters["a1"]), 409, "adapter_exists")
    for name in ("../evil", "a/b", "", "x" * 65, "base", "__base__", ".hidden", "ab:split"):
        assert_refused(server, register(server, name, adapters["a1"]), 400, "invalid_name")


def test_not_a_folder(server, tmp_path, unchanged):
    assert_refused(server, register(server, "bad", tmp_path / "nowhere"), 404, "path_not_found")
    (tmp_path / "a-file").write_text("not a folder")
    assert_refused(server, register(server, "bad", tmp_path / "a-file"), 400, "invalid_path")


def test_unsafe_archives(server, adapters, tmp_path, unchanged):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(adapters["a0"] / "adapter_config.json", arcname="../../escape.json")
    assert_refused(server, upload(server, "bad", "x.tar.gz", buf.getvalue()), 400, "unsafe_archive")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("adapter/adapter_model.safetensors")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tf.addfile(info)
    assert_refused(server, upload(server, "bad", "x.tar.gz", buf.getvalue()), 400, "unsafe_archive")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("/abs/adapter_config.json", "{}")
    assert_refused(server, upload(server, "bad", "x.zip", buf.getvalue()), 400, "unsafe_archive")
    assert_refused(server, upload(server, "bad", "x.rar", b"whatever"), 400, "invalid_archive")
    assert_refused(server, upload(server, "bad", "x.tar.gz", b"not a tar"), 400, "invalid_archive")


def test_oversized_adapter(server, adapters, tmp_path, unchanged):
    big = copy_adapter(adapters["a0"], tmp_path / "big")
    (big / "README.md").write_bytes(b"x" * 300 * 1024)  # limit in this server: 256 KiB
    assert_refused(server, register(server, "bad", big), 413, "adapter_too_large")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in adapters["a0"].iterdir():
            zf.write(f, f.name)
        zf.writestr("padding.txt", b"0" * 400 * 1024)  # small compressed, large unpacked
    assert_refused(server, upload(server, "bad", "x.zip", buf.getvalue()), 413, "adapter_too_large")


def test_registry_survives_restart_and_quarantines_corruption(tiny_model_path, adapters, tmp_path):
    data = tmp_path / "data"
    kwargs = dict(
        base_model=str(tiny_model_path),
        quantization="none",
        max_model_len=256,
        default_max_tokens=8,
        data_dir=data,
    )
    first = start_live_server(**kwargs)
    try:
        for name in ("keep", "corrupt"):
            assert register(first, name, adapters["a1"]).status_code == 201
        before = greedy(first, "keep")
        corrupt_path = Path(httpx.get(f"{first.url}/adapters/corrupt").json()["path"])
    finally:
        first.stop()
    (corrupt_path / "adapter_model.safetensors").write_bytes(b"garbage")
    (data / "adapters" / "store" / "orphan-123").mkdir()  # a crash mid-registration
    (data / "adapters" / ".staging" / "half").mkdir(parents=True)
    second = start_live_server(**kwargs)
    try:
        assert names(second) == ["keep"]
        assert greedy(second, "keep") == before
        assert list((data / "adapters" / "quarantine").iterdir())
        assert not (data / "adapters" / "store" / "orphan-123").exists()
        assert not list((data / "adapters" / ".staging").iterdir())
    finally:
        second.stop()


def test_removing_the_last_adapter_returns_to_the_plain_base(tiny_model_path, adapters, tmp_path):
    server = start_live_server(
        base_model=str(tiny_model_path),
        quantization="none",
        max_model_len=256,
        default_max_tokens=8,
        data_dir=tmp_path,
    )
    try:
        base = greedy(server, "base")
        assert register(server, "only", adapters["a0"]).status_code == 201
        with_adapter = greedy(server, "only")
        assert greedy(server, "base") == base
        assert httpx.delete(f"{server.url}/adapters/only").status_code == 200
        assert greedy(server, "base") == base
        assert register(server, "again", adapters["a0"]).status_code == 201
        assert greedy(server, "again") == with_adapter
    finally:
        server.stop()
