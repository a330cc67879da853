"""A process SIGKILLed while ingesting leaves the collection as it was before or after its
batch, with an index that agrees with the metadata."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rag.collection import Collection, DocumentInput
from tests.rag.fake_embedder import FakeEmbedder

CHILD = Path(__file__).with_name("crash_child.py")
BATCH_1 = [DocumentInput(f"old{i}", f"apple orchard harvest number {i}") for i in range(5)]
BEFORE = {f"old{i}" for i in range(5)}
AFTER = BEFORE | {f"new{i}" for i in range(5)}


@pytest.mark.parametrize(
    ("point", "expected"),
    [
        ("after_embed", BEFORE),
        ("after_sqlite_write", BEFORE),  # rows written, transaction not committed
        ("after_index_write", BEFORE),  # new index file on disk, metadata not committed
        ("after_commit", AFTER),  # committed, old index file not yet removed
        (None, AFTER),  # not killed at all
    ],
)
def test_sigkill_mid_ingest(tmp_path, point, expected):
    path = tmp_path / "c"
    with Collection.create(path, FakeEmbedder()) as c:
        c.add_documents(BATCH_1)
    marker = tmp_path / "paused"
    env = dict(os.environ)
    if point:
        env["SWAPSERVE_RAG_TEST_PAUSE_AT"] = point
        env["SWAPSERVE_RAG_TEST_PAUSE_MARKER"] = str(marker)
    proc = subprocess.Popen([sys.executable, str(CHILD), str(path)], env=env)
    try:
        if point:
            deadline = time.monotonic() + 60
            while not marker.exists():
                assert proc.poll() is None, "child exited before reaching the pause point"
                assert time.monotonic() < deadline, "child never reached the pause point"
                time.sleep(0.05)
            assert marker.read_text() == point
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == (-signal.SIGKILL if point else 0)

    with Collection.open(path, FakeEmbedder()) as c:
        assert c.index_size() == c.count_chunks()
        assert {d["id"] for d in c.documents()} == expected
        top = c.search("volcano lava eruption", top_k=3)
        if expected == AFTER:
            assert top[0].doc_id.startswith("new")
            assert [h.text for h in c.search("x", top_k=20) if h.doc_id == "old0"] == [
                "volcano replaced text"
            ]
        else:
            assert len(top) == 3 and all(h.doc_id.startswith("old") for h in top)
        # Still writable after recovery.
        c.add_documents([DocumentInput("later", "pear tree")])
        assert c.index_size() == c.count_chunks() == len(expected) + 1
    assert len(list(path.glob("index-*.faiss"))) == 1
