"""Fault tests on the real server in a process of its own (tiny model, fake embedder):

- kill -9 with an adapter upload, a RAG ingestion and a training job all in flight, then a
  restart on the same data dir: nothing half-registered, the collection as it was before
  the batch with an index that agrees with its metadata, the job recorded `interrupted`,
  and everything acknowledged (2xx) before the kill still there and served;
- corrupt files at start-up (adapter weights, a collection's index file, a collection's
  metadata, a job record): each set aside with a log line saying so, the rest served.

One crash and one restart serve both (server starts are the slow part of these tests):
the files corrupted before the restart belong to adapters, collections and jobs that
the crash checks do not look at.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import sys
import tarfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from rag.collection import Collection, check_index_file
from tests.rag.fake_embedder import FakeEmbedder
from tests.support import ServerProcess
from tests.tiny_model import build_lora_adapter
from tests.trainer.helpers import QA, house

HARNESS = [sys.executable, str(Path(__file__).with_name("serve_fake_embedder.py"))]
BATCH_1 = [{"id": f"old{i}", "text": f"apple orchard harvest number {i}"} for i in range(4)]
BATCH_2 = [{"id": f"new{i}", "text": f"volcano lava eruption number {i}"} for i in range(4)]
NOTES = [{"id": "n1", "text": "the meeting moved to thursday"}]
TRAIN_CONFIG = {"r": 4, "max_steps": 100000, "batch_size": 2, "max_length": 64,
                "eval_fraction": 0.0}  # fmt: skip


def server_for(model: Path, data: Path, **env: str) -> ServerProcess:
    return ServerProcess(model, data, env=env, argv=HARNESS)


def ok(r: httpx.Response, status: int | tuple[int, ...] = (200, 201, 202)) -> dict:
    statuses = (status,) if isinstance(status, int) else status
    assert r.status_code in statuses, r.text
    return r.json()


def tar_gz(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for f in sorted(folder.iterdir()):
            tf.add(f, arcname=f.name)
    return buf.getvalue()


def send_half_an_upload(url: str, name: str, archive: bytes) -> socket.socket:
    """A multipart POST /adapters whose body stops halfway: the server is mid-upload."""
    boundary = "swapserve-fault-test"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\n{name}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}.tar.gz"'
            "\r\nContent-Type: application/gzip\r\n\r\n"
        ).encode()
        + archive
        + f"\r\n--{boundary}--\r\n".encode()
    )
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = (
        f"POST /adapters HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body[: len(body) // 2])
    return sock


def wait_for(predicate, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def crashed(tiny_model_path, tmp_path_factory) -> dict:
    """A data dir left by kill -9 with three writes in flight (see the module doc)."""
    root = tmp_path_factory.mktemp("faults")
    data = root / "data"
    armed, marker = root / "armed", root / "paused"
    # one adapter built, copied under four names (building each costs a model load)
    built = build_lora_adapter(tiny_model_path, root / "keep", seed=1)
    adapters = {"keep": built}
    for name in ("other", "bad"):
        adapters[name] = Path(shutil.copytree(built, root / name))
    half = tar_gz(built)
    server = server_for(
        tiny_model_path,
        data,
        SWAPSERVE_RAG_TEST_PAUSE_AT="after_index_write",
        SWAPSERVE_RAG_TEST_PAUSE_MARKER=str(marker),
        SWAPSERVE_RAG_TEST_PAUSE_ARMED=str(armed),
    ).start()
    url = server.url
    worker_pid = None
    try:
        # acknowledged before the kill: all of this must survive it
        for name, path in adapters.items():
            ok(httpx.post(f"{url}/adapters", json={"name": name, "path": str(path)}, timeout=60))
        for name, docs in (("kb", BATCH_1), ("notes", NOTES), ("broken", NOTES)):
            ok(httpx.post(f"{url}/rag/collections", json={"name": name}, timeout=30))
            ok(
                httpx.post(
                    f"{url}/rag/collections/{name}/documents", json={"documents": docs}, timeout=60
                )
            )
        rows = [
            {
                "messages": [
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": house(a)},
                ]
            }
            for q, a in QA
        ]
        job = ok(
            httpx.post(
                f"{url}/train/sft",
                json={"name": "crash-job", "data": rows, "config": TRAIN_CONFIG},
                timeout=60,
            )
        )
        wait_for(
            lambda: httpx.get(f"{url}/train/jobs/{job['id']}").json()["state"] == "running",
            "the training job to start",
        )
        worker_pid = json.loads((data / "train" / job["id"] / "job.json").read_text())["pid"]

        # in flight at the kill: an ingestion parked between writing its index file and
        # committing its metadata, and an adapter upload half sent
        armed.touch()

        def post_batch_2() -> None:
            try:  # never answered: the server dies first
                httpx.post(
                    f"{url}/rag/collections/kb/documents", json={"documents": BATCH_2}, timeout=120
                )
            except httpx.HTTPError:
                pass

        ingest = threading.Thread(target=post_batch_2, daemon=True)
        ingest.start()
        wait_for(marker.exists, "the ingestion to reach its pause point")
        sock = send_half_an_upload(url, "half", half)
        time.sleep(0.5)
        server.kill()  # SIGKILL: no clean-up at all
        # and the worker with it, as an OOM kill of the whole container would
        if worker_pid and pid_alive(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)
        sock.close()
        ingest.join(30)
    finally:
        server.kill()
        if worker_pid and pid_alive(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)
    assert server.proc.returncode == -signal.SIGKILL
    record = json.loads((data / "train" / job["id"] / "job.json").read_text())
    assert record["state"] == "running"  # what the dead server left behind
    return {"data": data, "job": job["id"], "model": tiny_model_path, "root": root}


@pytest.fixture(scope="module")
def corrupted(crashed) -> dict:
    """On top of the crash, files broken while the server was down."""
    data = crashed["data"]
    records = json.loads((data / "adapters" / "registry.json").read_text())["adapters"]
    # adapter 'bad': garbage weights
    (Path(records["bad"]["path"]) / "adapter_model.safetensors").write_bytes(b"\x00junk" * 64)
    # what a kill mid-registration can leave: a stored folder never recorded, a staging dir
    shutil.copytree(crashed["root"] / "keep", data / "adapters" / "store" / "ghost-1")
    (data / "adapters" / ".staging" / "abc").mkdir(parents=True)
    # collection 'notes': its index file is garbage; collection 'broken': its metadata is
    notes_index, _ = check_index_file(data / "rag" / "notes")
    assert notes_index is not None
    notes_index.write_bytes(os.urandom(4096))
    (data / "rag" / "broken" / "meta.sqlite").write_bytes(b"not a database " * 512)
    # a job record that is not JSON, beside the good one
    bad_job = data / "train" / "20250101-000000-deadbeef"
    bad_job.mkdir()
    (bad_job / "job.json").write_text('{"id": "20250101-000000-deadbeef", "state": "runn')
    return {**crashed, "notes_index": notes_index.name, "bad_job": bad_job}


@pytest.fixture(scope="module")
def restarted(corrupted):
    server = server_for(corrupted["model"], corrupted["data"]).start()
    yield server
    server.kill()


def registry_names(data: Path) -> set[str]:
    return set(json.loads((data / "adapters" / "registry.json").read_text())["adapters"])


def assert_adapters_consistent(url: str, data: Path, expected: set[str]) -> None:
    listed = {a["id"] for a in ok(httpx.get(f"{url}/adapters", timeout=30))["data"]}
    assert listed == registry_names(data) == expected
    records = json.loads((data / "adapters" / "registry.json").read_text())["adapters"]
    stored = {p.name for p in (data / "adapters" / "store").iterdir()}
    assert stored == {Path(r["path"]).name for r in records.values()}
    assert list((data / "adapters" / ".staging").iterdir()) == []


def assert_index_agrees(collection: Path, ids: set[str]) -> None:
    with Collection.open(collection, FakeEmbedder()) as c:
        assert c.index_size() == c.count_chunks()
        assert {d["id"] for d in c.documents()} == ids


def chat(server: ServerProcess, model: str) -> str | None:
    out = server.openai(timeout=60).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    return out.choices[0].finish_reason


def search(url: str, collection: str, query: str) -> set[str]:
    hits = ok(
        httpx.post(
            f"{url}/rag/collections/{collection}/search",
            json={"query": query, "top_k": 10},
            timeout=30,
        )
    )
    return {h["doc_id"] for h in hits["data"]}


def test_restart_after_kill_9_keeps_what_was_acknowledged(restarted, corrupted):
    data, url = corrupted["data"], restarted.url
    # adapters: the acknowledged ones ('bad' aside, see below), nothing of the half upload
    assert_adapters_consistent(url, data, {"keep", "other"})
    assert chat(restarted, "keep") in ("stop", "length")
    assert chat(restarted, "other") in ("stop", "length")
    r = httpx.get(f"{url}/adapters/half", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"

    # the collection is as before the batch that was cut, searchable and writable
    info = ok(httpx.get(f"{url}/rag/collections/kb", timeout=30))
    assert info["documents"] == len(BATCH_1) and info["chunks"] >= len(BATCH_1)
    assert search(url, "kb", "volcano") == {d["id"] for d in BATCH_1}
    assert_index_agrees(data / "rag" / "kb", {d["id"] for d in BATCH_1})
    ok(httpx.post(f"{url}/rag/collections/kb/documents", json={"documents": BATCH_2[:1]}))
    assert_index_agrees(data / "rag" / "kb", {d["id"] for d in BATCH_1} | {"new0"})

    # the job: still there, and marked interrupted rather than left 'running'
    job = ok(httpx.get(f"{url}/train/jobs/{corrupted['job']}", timeout=30))
    assert job["state"] == "interrupted" and "stopped" in job["error"], job
    assert "training jobs interrupted by the last shutdown" in restarted.log()


def test_corrupt_files_at_start_up_are_quarantined_and_the_rest_served(restarted, corrupted):
    data, url, log = corrupted["data"], restarted.url, restarted.log()
    # adapter with garbage weights: quarantined, the others served (checked above)
    assert "adapter 'bad' failed validation at start-up, quarantined" in log
    assert "bad" not in {a["id"] for a in ok(httpx.get(f"{url}/adapters"))["data"]}
    assert any(p.name.startswith("bad-") for p in (data / "adapters" / "quarantine").iterdir())

    # index file garbage: the file set aside, the index rebuilt from the stored vectors
    index = corrupted["notes_index"]
    assert f"collection notes: index file {index} fails its checksum; quarantined" in log
    assert search(url, "notes", "meeting") == {"n1"}
    assert_index_agrees(data / "rag" / "notes", {"n1"})
    assert "rebuilding index" in restarted.log()
    # metadata garbage: the whole collection set aside, the others listed and served
    assert "collection broken quarantined at start-up" in log
    listed = {c["id"] for c in ok(httpx.get(f"{url}/rag/collections", timeout=30))["data"]}
    assert listed == {"kb", "notes"}
    r = httpx.get(f"{url}/rag/collections/broken", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "collection_not_found"
    rag_quarantine = {p.name for p in (data / "rag" / ".quarantine").iterdir()}
    assert any(n.startswith("broken-") for n in rag_quarantine)
    assert any(n.startswith(f"notes-{index}") for n in rag_quarantine)

    # a job record that is not JSON: set aside, the other jobs listed
    bad_job = corrupted["bad_job"]
    assert f"job record {bad_job.name} unreadable" in log
    jobs = ok(httpx.get(f"{url}/train/jobs", timeout=30))["data"]
    assert [j["id"] for j in jobs] == [corrupted["job"]]
    assert httpx.get(f"{url}/train/jobs/{bad_job.name}", timeout=30).status_code == 404
    assert not bad_job.exists() and (data / "train" / ".quarantine").is_dir()


def test_sigterm_on_an_idle_server_exits_at_once(restarted):
    """Nothing in flight: the drain ends at once, not after the (default 30 s) grace."""
    sent = time.monotonic()
    code = restarted.stop(timeout_s=60)
    assert code == 0, restarted.log()
    assert time.monotonic() - sent < 15
    assert "drained in" in restarted.log()
