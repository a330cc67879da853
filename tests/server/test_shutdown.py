"""Graceful shutdown of `swapserve serve` (server/drain.py), on the real server in a
process of its own, driven by the real `openai` SDK: SIGTERM drains (503 for new
requests, /ready says draining), running streams finish within the grace or end with a
final `finish_reason: "abort"` chunk and `data: [DONE]`, training workers end
`interrupted`, and the process exits on its own within the grace plus a small margin."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support import ServerProcess, start_live_server
from tests.tiny_model import build_tiny_model
from tests.trainer.helpers import QA, house

# The cut comes a quarter of the grace before its end so that the last chunks, closing the
# connections and the stores fit inside it (5.2 s for a 5 s grace on a quiet machine);
# the margin is for a loaded CI box.
EXIT_MARGIN_S = 3.0
MESSAGES = [{"role": "user", "content": "Tell me a long story."}]


@pytest.fixture(scope="module")
def long_model(tmp_path_factory) -> Path:
    """The tiny model with room for streams far longer than any grace used here."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-long"), max_position_embeddings=8192)


def start(model: Path, data_dir: Path, grace_s: float) -> ServerProcess:
    return ServerProcess(
        model,
        data_dir,
        env={
            "SWAPSERVE_SHUTDOWN_GRACE_S": str(grace_s),
            "SWAPSERVE_MAX_MODEL_LEN": "8192",
            "SWAPSERVE_DEFAULT_MAX_TOKENS": "16",
        },
    ).start()


def raw_stream(url: str, body: dict, out: list[str], started: threading.Event) -> None:
    """Every SSE line of one streamed chat, read with plain httpx (no SDK leniency)."""
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
            out.append(f"status {r.status_code}")
            for line in r.iter_lines():
                if line:
                    out.append(line)
                    if line.startswith("data: {") and '"content":"' in line:
                        started.set()
    except httpx.HTTPError as exc:  # a torn connection lands here
        out.append(f"error {type(exc).__name__}: {exc}")
    finally:
        started.set()


def assert_draining(server: ServerProcess) -> None:
    r = httpx.get(f"{server.url}/v1/models", timeout=10)
    assert r.status_code == 503, r.text
    assert r.json() == {
        "error": {
            "message": r.json()["error"]["message"],
            "type": "server_error",
            "param": None,
            "code": "shutting_down",
        }
    }
    assert r.headers["retry-after"].isdigit()
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "base", "messages": MESSAGES, "max_tokens": 4},
        timeout=10,
    )
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    ready = httpx.get(f"{server.url}/ready", timeout=10)
    assert ready.status_code == 503
    assert ready.json()["status"] == "draining" and ready.json()["in_flight"] >= 1
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_sigterm_drains_then_cuts_streams_cleanly(long_model, tmp_path):
    grace = 5.0
    server = start(long_model, tmp_path / "data", grace)
    try:
        # A training job that is running when the signal comes must end 'interrupted'.
        rows = [
            {
                "messages": [
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": house(a)},
                ]
            }
            for q, a in QA
        ]
        config = {"r": 4, "max_steps": 100000, "batch_size": 2, "max_length": 64,
                  "eval_fraction": 0.0}  # fmt: skip
        r = httpx.post(
            f"{server.url}/train/sft",
            json={"name": "long-job", "data": rows, "config": config},
            timeout=60,
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 60
        while httpx.get(f"{server.url}/train/jobs/{job_id}").json()["state"] != "running":
            assert time.monotonic() < deadline, "the training job never started"
            time.sleep(0.2)

        # Two streams that cannot finish within the grace: one through the openai SDK, one
        # read line by line (n=2, usage asked for) to see exactly what ends it.
        raw: list[str] = []
        raw_started = threading.Event()
        body = {"model": "base", "messages": MESSAGES, "max_tokens": 6000, "ignore_eos": True,
                "stream": True, "n": 2, "stream_options": {"include_usage": True}}  # fmt: skip
        reader = threading.Thread(target=raw_stream, args=(server.url, body, raw, raw_started))
        reader.start()
        client = server.openai(timeout=120)
        long = client.chat.completions.create(
            model="base", messages=MESSAGES, max_tokens=6000, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        chunks = []
        for chunk in long:
            chunks.append(chunk)
            if len(chunks) >= 3:
                break
        assert raw_started.wait(60) and not any(x.startswith("error") for x in raw), raw
        # and one that can: a few tokens, in flight when the signal comes
        short = client.chat.completions.create(
            model="base", messages=MESSAGES, max_tokens=4, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        short_chunks = [next(iter(short))]

        server.signal(signal.SIGTERM)
        sent = time.monotonic()
        time.sleep(0.3)
        assert_draining(server)

        short_chunks += list(short)
        chunks += list(long)  # the SDK ends the iteration at `data: [DONE]`
        reader.join(60)
        code = server.wait(grace + EXIT_MARGIN_S)
        exited_after = time.monotonic() - sent
    finally:
        server.kill()
    log = server.log()
    assert code == 0, log
    assert exited_after < grace + EXIT_MARGIN_S
    assert "shutting down: draining 3 request(s)" in log and "cutting 2 request(s)" in log

    # the short stream finished on its own within the grace: 4 tokens, "length"
    assert [c.choices[0].finish_reason for c in short_chunks if c.choices][-1] == "length"

    # SDK stream: text, then one final chunk with finish_reason "abort"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason is not None]
    assert [c.choices[0].finish_reason for c in finals] == ["abort"], chunks[-3:]
    assert chunks[-1] is finals[0]
    assert "".join(c.choices[0].delta.content or "" for c in chunks)

    # raw stream: a final chunk per choice, usage, [DONE], and nothing torn
    assert raw[0] == "status 200", raw[:3]
    assert raw[-1] == "data: [DONE]", raw[-3:]
    events = [json.loads(x[len("data: ") :]) for x in raw[1:-1]]
    ends = {e["choices"][0]["index"]: e["choices"][0]["finish_reason"] for e in events
            if e["choices"] and e["choices"][0]["finish_reason"]}  # fmt: skip
    assert ends == {0: "abort", 1: "abort"}
    usage = events[-1]["usage"]
    assert events[-1]["choices"] == [] and usage["completion_tokens"] >= 2

    # the training job: recorded interrupted (not lost, not 'running', not 'failed')
    record = json.loads((tmp_path / "data" / "train" / job_id / "job.json").read_text())
    assert record["state"] == "interrupted", record


def test_the_cut_ends_streamed_and_plain_requests_with_abort(long_model, tmp_path):
    """The end of the grace, in-process: Drain.cut_now while a stream and a plain request
    run; both end as answers (finish_reason "abort"), the engine keeps no row."""
    server = start_live_server(
        base_model=str(long_model),
        quantization="none",
        max_model_len=8192,
        data_dir=tmp_path / "data",
    )
    try:
        drain = server.app.state.drain
        client = server.openai(timeout=120)
        plain: list = []
        worker = threading.Thread(
            target=lambda: plain.append(
                client.completions.create(
                    model="base", prompt="Once", max_tokens=6000, extra_body={"ignore_eos": True}
                )
            )
        )
        worker.start()
        stream = client.completions.create(
            model="base", prompt="Once", max_tokens=6000, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        chunks = [next(iter(stream))]
        deadline = time.monotonic() + 60
        while drain.in_flight < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        drain.cut_now()
        chunks += list(stream)
        worker.join(60)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "abort"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
        assert plain and plain[0].choices[0].finish_reason == "abort"
        assert plain[0].usage.completion_tokens < 6000
        deadline = time.monotonic() + 30
        while server.app.state.engine.stats()["running"]:
            assert time.monotonic() < deadline, "cut rows still in the batch"
            time.sleep(0.05)
    finally:
        server.stop()
