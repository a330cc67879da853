"""clients.Swapserve and AsyncSwapserve against the real server on the tiny model: every
admin area (adapters, training, retrieval, experiments, splits, feedback), typed errors,
and an import that pulls in no torch."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import openai
import pytest

from clients import (
    AsyncSwapserve,
    BadRequestError,
    ConflictError,
    NotFoundError,
    Swapserve,
    SwapserveError,
)
from server.schemas import AdapterInfo, SearchResult, TrainEvent, TrainJob
from tests.rag.fake_embedder import FakeEmbedder
from tests.support import start_live_server
from tests.tiny_model import build_lora_adapter
from tests.trainer.helpers import QA, house

CONFIG = {
    "r": 4,
    "learning_rate": 1e-2,
    "max_steps": 3,
    "batch_size": 4,
    "max_length": 128,
    "eval_fraction": 0.0,
    "device": "cpu",
}


@pytest.fixture(scope="module")
def server(tiny_model_path, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        # retrieval embeds with the tests' bag-of-words embedder: no sentence-transformers
        mp.setattr("server.retrieval.get_embedder", lambda path=None: FakeEmbedder())
        server = start_live_server(
            base_model=str(tiny_model_path),
            quantization="none",
            max_model_len=256,
            default_max_tokens=8,
            data_dir=tmp_path_factory.mktemp("client-data"),
        )
        yield server
        server.stop()


@pytest.fixture()
def ss(server):
    with Swapserve(server.url) as client:
        client.wait_ready()
        yield client


def test_import_needs_no_torch():
    code = (
        "import sys, clients, clients.admin; "
        "heavy = [m for m in ('torch', 'transformers', 'fastapi', 'faiss') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_adapters_and_typed_errors(ss, tiny_model_path, tmp_path):
    folder = build_lora_adapter(tiny_model_path, tmp_path / "ad")
    archive = tmp_path / "ad.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder, arcname="ad")
    info = ss.adapters.register("cl-a", folder)
    assert isinstance(info, AdapterInfo) and info.rank == 4 and info.location
    assert ss.adapters.upload("cl-b", archive).name == "cl-b"
    assert {"cl-a", "cl-b"} <= {a.name for a in ss.adapters.list()}
    with pytest.raises(ConflictError) as err:
        ss.adapters.register("cl-a", folder)
    assert (err.value.status, err.value.code, err.value.param) == (409, "adapter_exists", "name")
    with pytest.raises(BadRequestError) as err:
        ss.adapters.register("../evil", folder)
    assert err.value.code == "invalid_name" and err.value.type == "invalid_request_error"
    assert ss.adapters.delete("cl-b").deleted
    with pytest.raises(NotFoundError):
        ss.adapters.get("cl-b")
    assert isinstance(err.value, SwapserveError)


def test_training_dry_run_follow_wait_card(ss, tmp_path):
    data = tmp_path / "train.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": house(a)}]}
        for q, a in QA
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    preview = ss.training.dry_run("sft", "cl-sft", data, config=CONFIG)
    assert preview.loss_open in preview.rendered and preview.first_loss_tokens > 0
    assert preview.counts["examples"] == len(rows)
    with pytest.raises(BadRequestError) as err:
        ss.training.dry_run("sft", "cl-sft", data, config={**CONFIG, "r": -1})
    assert err.value.param == "config.r"

    job = ss.training.sft("cl-sft", data, config=CONFIG)
    assert isinstance(job, TrainJob) and job.state in ("queued", "running")
    events = list(ss.training.follow(job.id))
    assert all(isinstance(e, TrainEvent) for e in events)
    steps = [e.model_extra["step"] for e in events if e.type == "progress"]
    assert steps and max(steps) == CONFIG["max_steps"]
    done = ss.training.wait(job.id, timeout=120)
    assert done.state == "succeeded" and done.registered
    card = ss.training.card(job.id)
    assert card["hyperparameters"]["r"] == 4 and card["data"]["sha256"]
    assert ss.adapters.get("cl-sft").name == "cl-sft"
    with pytest.raises(ConflictError):
        ss.training.cancel(job.id)  # finished: nothing to cancel


def test_rag_experiment_split_feedback(ss, server, tmp_path):
    note = tmp_path / "reactor.md"
    note.write_text("The Zorblax-7 reactor runs on frozen lemonade.")
    ss.rag.create("cl-kb")
    assert ss.rag.ingest("cl-kb", [note], metadata={"team": "ops"}).added == 1
    assert ss.rag.add("cl-kb", [{"id": "d2", "text": "Ferries leave at noon."}]).documents == 2
    hits = ss.rag.search("cl-kb", "reactor lemonade", top_k=2)
    assert isinstance(hits, SearchResult) and hits.data[0].doc_id == "reactor.md"
    assert {d.id for d in ss.rag.documents("cl-kb").data} == {"reactor.md", "d2"}
    assert ss.rag.delete_document("cl-kb", "d2").deleted
    assert ss.rag.get("cl-kb").documents == 1

    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "What fuel?", "references": ["lemonade"]}) + "\n")
    exp = ss.experiments.run(
        questions,
        [
            {"name": "base", "model": "base"},
            {"name": "base+rag", "model": "base", "rag": {"collection": "cl-kb"}},
        ],
        max_tokens=4,
    )
    seen = list(ss.experiments.follow(exp.id, poll_s=0.5))
    assert seen[-1].status == "completed"
    assert set(seen[-1].summary["arms"]) == {"base", "base+rag"}
    assert "<svg" in ss.experiments.report(exp.id)

    ss.splits.create("cl-split", [{"name": "a", "model": "base"}, {"name": "b", "model": "base"}])
    oa = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    msgs = [{"role": "user", "content": "hi"}]
    first = oa.chat.completions.create(model="ab:cl-split", messages=msgs, max_tokens=3, user="u")
    second = oa.chat.completions.create(model="ab:cl-split", messages=msgs, max_tokens=3, user="v")
    ack = ss.splits.feedback(first.id, preferred_over=second.id)
    assert ack.split == "cl-split"
    assert sum(ss.splits.get("cl-split").counts.values()) == 2
    pairs = ss.splits.preferences("cl-split")
    assert pairs and {"prompt", "chosen", "rejected"} <= set(pairs[0])


def test_async_client(server, tiny_model_path, tmp_path):
    folder = build_lora_adapter(tiny_model_path, tmp_path / "ad")

    async def main() -> None:
        async with AsyncSwapserve(server.url) as ss:
            assert (await ss.session()).admin
            assert (await ss.adapters.register("cl-async", folder)).name == "cl-async"
            with pytest.raises(ConflictError):
                await ss.adapters.register("cl-async", folder)
            await ss.rag.create("cl-async-kb")
            await ss.rag.add("cl-async-kb", [{"text": "Owls hunt at night."}])
            hits = await ss.rag.search("cl-async-kb", "owls")
            assert hits.data
            jobs = await ss.training.list()
            for job in jobs:  # replays a finished job's events, then ends
                events = [e async for e in ss.training.follow(job.id)]
                assert events[0].type == "state"
            assert (await ss.adapters.delete("cl-async")).deleted

    asyncio.run(main())


def test_upload_without_a_telling_file_name(ss, tiny_model_path, tmp_path):
    """An archive whose name has no .tar.gz/.zip (a browser blob) is recognised by its
    bytes."""
    folder = build_lora_adapter(tiny_model_path, tmp_path / "ad")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(folder, arcname="ad")
    blob = tmp_path / "blob"
    blob.write_bytes(buf.getvalue())
    assert ss.adapters.upload("cl-blob", Path(blob)).name == "cl-blob"
    ss.adapters.delete("cl-blob")
