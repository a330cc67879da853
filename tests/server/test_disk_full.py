"""A full disk under the data dir: every write is a 507 in the error shape, leaves nothing
behind, and the server goes on serving.

The data dir lives on a small tmpfs that the test mounts and unmounts (it needs root, or
the capability to mount; without it the module skips saying so). The real server runs in a
process of its own (tiny model, the tests' fake embedder).
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support import ServerProcess
from tests.tiny_model import build_lora_adapter

HARNESS = [sys.executable, str(Path(__file__).with_name("serve_fake_embedder.py"))]
DISK_BYTES = 32 * 1024 * 1024
ROWS = [
    {"messages": [{"role": "user", "content": f"question {i}"},
                  {"role": "assistant", "content": f"answer {i}"}]}
    for i in range(8)
]  # fmt: skip


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory):
    mnt = tmp_path_factory.mktemp("small-disk")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for the data dir: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(root: Path, leave_bytes: int = 0) -> Path:
    """Fill the filesystem under `root` until at most `leave_bytes` stay free."""
    filler = root / f"filler-{uuid.uuid4().hex[:6]}"
    chunk = b"\0" * 4096
    with filler.open("wb", buffering=0) as f:  # unbuffered: nothing left to flush at close
        try:
            while shutil.disk_usage(root).free > leave_bytes + len(chunk):
                f.write(chunk)
                f.flush()
            if leave_bytes == 0:
                while True:
                    f.write(chunk)
                    f.flush()
        except OSError:
            pass
    return filler


def is_507(r: httpx.Response) -> None:
    assert r.status_code == 507, r.text
    err = r.json()["error"]
    assert err["code"] == "insufficient_storage"
    assert err["type"] == "server_error"
    assert "full" in err["message"] and "SWAPSERVE_DATA_DIR" in err["message"]
    assert set(err) == {"message", "type", "param", "code"}


def tree(root: Path) -> set[str]:
    """Files and non-empty folders (an empty staging root is nothing half-written)."""
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if "filler" not in p.name and (p.is_file() or any(p.iterdir()))
    }


@pytest.fixture(scope="module")
def server(disk: Path, tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory):
    adapter = build_lora_adapter(tiny_model_path, tmp_path_factory.mktemp("ad") / "a", seed=3)
    # the data dir is the small disk itself (the server's log goes beside it, off it)
    srv = ServerProcess(
        tiny_model_path, disk, argv=HARNESS, env={"SWAPSERVE_MAX_LORA_RANK": "64"}
    ).start()
    try:
        url = srv.url
        assert (
            httpx.post(f"{url}/adapters", json={"name": "kept", "path": str(adapter)}).status_code
            == 201
        )
        assert httpx.post(f"{url}/rag/collections", json={"name": "kb"}).status_code == 201
        r = httpx.post(
            f"{url}/rag/collections/kb/documents",
            json={"documents": [{"id": "d1", "text": "apple orchard harvest"}]},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        print("used after set-up:", shutil.disk_usage(disk).used)
        yield {"srv": srv, "url": url, "adapter": adapter, "data": disk, "disk": disk}
    finally:
        srv.stop()


@pytest.fixture
def full(server):
    """The disk full for the test's duration, then freed."""
    filler = fill(server["disk"])
    yield server
    filler.unlink()


def still_serving(url: str) -> None:
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "kept", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    r = httpx.post(f"{url}/rag/collections/kb/search", json={"query": "apple"}, timeout=60)
    assert r.status_code == 200 and r.json()["data"], r.text


def test_adapter_register_and_upload_are_507_and_leave_nothing(full):
    url, data = full["url"], full["data"]
    before = tree(data)
    is_507(httpx.post(f"{url}/adapters", json={"name": "new", "path": str(full["adapter"])}))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for f in sorted(full["adapter"].iterdir()):
            tf.add(f, arcname=f.name)
    r = httpx.post(
        f"{url}/adapters",
        data={"name": "up"},
        files={"file": ("up.tar.gz", buf.getvalue(), "application/gzip")},
        timeout=60,
    )
    is_507(r)
    # vLLM's alias goes the same way
    r = httpx.post(
        f"{url}/v1/load_lora_adapter",
        json={"lora_name": "alias", "lora_path": str(full["adapter"])},
    )
    is_507(r)
    assert [a["name"] for a in httpx.get(f"{url}/adapters").json()["data"]] == ["kept"]
    assert tree(data) == before  # no staging folder, no temp archive, no stored copy
    still_serving(url)


def test_ingest_is_507_and_the_collection_is_unchanged(full):
    url, data = full["url"], full["data"]
    before = tree(data)
    docs = [{"id": f"n{i}", "text": "volcano lava eruption " * 200} for i in range(20)]
    r = httpx.post(f"{url}/rag/collections/kb/documents", json={"documents": docs}, timeout=60)
    is_507(r)
    listed = httpx.get(f"{url}/rag/collections/kb/documents").json()["data"]
    assert [d["id"] for d in listed] == ["d1"]
    assert tree(data) - before == set()  # nothing new left behind
    still_serving(url)


def test_training_submission_is_507_and_no_job_is_left(full):
    url, data = full["url"], full["data"]
    before = tree(data)
    r = httpx.post(f"{url}/train/sft", json={"name": "t-full", "data": ROWS * 50}, timeout=60)
    is_507(r)
    assert httpx.get(f"{url}/train/jobs").json()["data"] == []
    assert tree(data) - before == set()
    still_serving(url)


def test_training_output_on_a_full_disk_fails_clearly_and_registers_nothing(server):
    """The job is accepted with the disk nearly full, too full for its adapter: the job ends
    `failed` saying the disk is full, no adapter folder stays, nothing is registered."""
    url = server["url"]
    config = {"r": 64, "max_steps": 2, "batch_size": 2, "max_length": 32, "eval_fraction": 0.0}
    # room for the job's data and small records, not for a rank-64 adapter
    filler = fill(server["disk"], leave_bytes=256 * 1024)
    try:
        r = httpx.post(f"{url}/train/sft", json={"name": "t-out", "data": ROWS, "config": config})
        assert r.status_code == 202, r.text
        job = r.json()["id"]
        deadline = time.monotonic() + 300
        while True:
            rec = httpx.get(f"{url}/train/jobs/{job}").json()
            if rec["state"] in ("succeeded", "failed", "cancelled", "interrupted"):
                break
            assert time.monotonic() < deadline, rec
            time.sleep(0.5)
        assert rec["state"] == "failed", rec
        assert rec["error_type"] == "insufficient_storage", (rec["error"], rec.get("error_type"))
        assert "data directory is full" in rec["error"], rec
        assert not (Path(rec["output_dir"])).exists()
        assert "t-out" not in [a["name"] for a in httpx.get(f"{url}/adapters").json()["data"]]
        still_serving(url)
    finally:
        filler.unlink()
