"""Training through the HTTP API on the tiny model: submit SFT/DPO jobs (inline JSON and
multipart), watch progress, get the adapter served by name without a restart, cancel,
restart, and every bad request refused with the OpenAI error shape before training."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support import start_live_server
from tests.tiny_model import build_lora_adapter
from tests.trainer.helpers import QA, house
from trainer.records import TERMINAL, write_record

WAIT_S = 240
# Small and fast on 2 CPU cores: rank 4, 3 steps, no eval.
CONFIG = {
    "r": 4,
    "learning_rate": 1e-2,
    "max_steps": 3,
    "batch_size": 4,
    "max_length": 128,
    "eval_fraction": 0.0,
    "device": "cpu",
}
SFT_ROWS = [
    {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": house(a)}]}
    for q, a in QA
]
DPO_ROWS = [{"prompt": q, "chosen": house(a), "rejected": f"The answer is {a}."} for q, a in QA]


@pytest.fixture(scope="module")
def server(tiny_model_path, tmp_path_factory):
    data = tmp_path_factory.mktemp("train-data")
    server = start_live_server(
        base_model=str(tiny_model_path),
        quantization="none",
        max_model_len=256,
        default_max_tokens=16,
        max_body_bytes=64 * 1024,
        data_dir=data,
    )
    server.data_dir = data
    yield server
    server.stop()


def submit(server, kind="sft", **body):
    body.setdefault("config", CONFIG)
    return httpx.post(f"{server.url}/train/{kind}", json=body, timeout=60)


def job(server, job_id) -> dict:
    r = httpx.get(f"{server.url}/train/jobs/{job_id}", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def wait_settled(server, job_id, timeout_s=WAIT_S) -> tuple[dict, list[dict]]:
    """Poll until terminal and (for a success) registered; return the record and every
    distinct snapshot seen on the way."""
    seen: list[dict] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = job(server, job_id)
        if not seen or (record["state"], record["step"]) != (seen[-1]["state"], seen[-1]["step"]):
            seen.append(record)
        if record["state"] in TERMINAL and (
            record["state"] != "succeeded" or record.get("notified")
        ):
            return record, seen
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} not settled: {seen[-1] if seen else None}")


def wait_for(predicate, timeout_s=WAIT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError("condition not met in time")


def adapter_names(server) -> list[str]:
    return [a["name"] for a in httpx.get(f"{server.url}/adapters").json()["data"]]


def model_ids(server) -> list[str]:
    return [m.id for m in server.openai().models.list().data]


def assert_error(r: httpx.Response, status: int, param: str | None = None, code=None) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err["message"]


def test_sft_inline_trains_registers_and_serves_by_name(server, tiny_model_path):
    r = submit(server, name="house-sft", data=SFT_ROWS)
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted["object"] == "train.job" and accepted["kind"] == "sft"
    assert accepted["state"] == "queued" and accepted["progress"] == 0.0
    assert accepted["data_counts"] == {
        "examples": 8,
        "lines": 8,
        "format": "chat",
        "assistant_turns": 8,
        "with_tools": 0,
    }
    # the server's base and quantization were filled in
    assert Path(accepted["config"]["base_model"]).resolve() == tiny_model_path.resolve()
    assert accepted["config"]["quantization"] == "none"
    assert "pid" not in accepted and "data_path" not in accepted

    record, _ = wait_settled(server, accepted["id"])

    assert record["state"] == "succeeded", record
    assert record["step"] == record["total_steps"] == 3
    assert record["progress"] == 1.0 and record["eta_s"] == 0
    assert [p["step"] for p in record["loss_history"]] == [1, 2, 3]
    assert record["registered"] and record["registration_error"] is None
    # served at once, no restart: listed and usable by name
    assert "house-sft" in adapter_names(server)
    assert "house-sft" in model_ids(server)
    answer = server.openai().chat.completions.create(
        model="house-sft",
        messages=[{"role": "user", "content": "What is 2 plus 2?"}],
        max_tokens=4,
        temperature=0,
    )
    assert answer.model == "house-sft" and answer.choices[0].message.content is not None

    # events: a JSON list that can be followed with `since`
    ev = httpx.get(f"{server.url}/train/jobs/{accepted['id']}/events").json()
    types = [e["type"] for e in ev["data"]]
    assert types.count("progress") == 3 and "registered" in types
    progress = [e for e in ev["data"] if e["type"] == "progress"]
    assert progress[-1]["step"] == 3 and progress[-1]["loss"] is not None
    assert ev["state"] == "succeeded" and ev["next_since"] == ev["data"][-1]["seq"] + 1
    later = httpx.get(
        f"{server.url}/train/jobs/{accepted['id']}/events", params={"since": ev["next_since"]}
    ).json()
    assert later["data"] == []
    # the same as SSE: one `event:` per job event, closed by `event: end`
    with httpx.stream(
        "GET",
        f"{server.url}/train/jobs/{accepted['id']}/events",
        headers={"Accept": "text/event-stream"},
        timeout=30,
    ) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        text = "".join(stream.iter_text())
    assert text.count("event: progress\n") == 3 and text.rstrip().split("\n")[-2] == "event: end"

    listed = httpx.get(f"{server.url}/train/jobs").json()
    assert accepted["id"] in [j["id"] for j in listed["data"]]


def test_eval_loss_during_training_reaches_the_job_and_its_event_stream(server):
    # an eval set measured after every step (no early stopping, a 2-token final eval)
    config = {
        **CONFIG,
        "eval_steps": 1,
        "early_stopping_patience": 0,
        "eval_max_examples": 1,
        "eval_max_new_tokens": 2,
    }
    r = submit(server, name="evalcurve", data=SFT_ROWS, eval_data=SFT_ROWS[:2], config=config)
    assert r.status_code == 202, r.text
    assert r.json()["eval_loss_history"] == [] and r.json()["eval_loss"] is None
    record, _ = wait_settled(server, r.json()["id"])

    assert record["state"] == "succeeded", record
    history = record["eval_loss_history"]
    assert [p["step"] for p in history] == [1, 2, 3]  # the evals after training add none
    assert all(p["eval_loss"] > 0 for p in history)
    assert record["eval_loss"] == history[-1]["eval_loss"]
    assert record["result"]["eval"]["eval_loss"]["adapter"] is not None
    # each eval's event comes right after its step's progress event, while training runs
    events = httpx.get(f"{server.url}/train/jobs/{r.json()['id']}/events").json()["data"]
    steps = [(e["type"], e["step"]) for e in events if e["type"] in ("progress", "eval_loss")]
    assert steps[:6] == [(t, n) for n in (1, 2, 3) for t in ("progress", "eval_loss")]
    evals = [e for e in events if e["type"] == "eval_loss"]
    assert [{"step": e["step"], "eval_loss": e["eval_loss"]} for e in evals] == history
    assert all(e["loss"] is not None and e["total_steps"] == 3 for e in evals)
    with httpx.stream(
        "GET",
        f"{server.url}/train/jobs/{r.json()['id']}/events",
        headers={"Accept": "text/event-stream"},
        timeout=30,
    ) as stream:
        assert "".join(stream.iter_text()).count("event: eval_loss\n") == 3


def test_dpo_multipart_upload_trains_and_serves(server, tmp_path):
    data = "".join(json.dumps(r) + "\n" for r in DPO_ROWS)
    r = httpx.post(
        f"{server.url}/train/dpo",
        data={"name": "prefs", "config": json.dumps(CONFIG)},
        files={"file": ("prefs.jsonl", data.encode(), "application/jsonl")},
        timeout=60,
    )
    assert r.status_code == 202, r.text
    assert r.json()["kind"] == "dpo" and r.json()["data_counts"]["format"] == "preference"

    record, _ = wait_settled(server, r.json()["id"])

    assert record["state"] == "succeeded", record
    assert record["registered"] and len(record["loss_history"]) == 3
    assert "prefs" in adapter_names(server) and "prefs" in model_ids(server)
    out = server.openai().completions.create(model="prefs", prompt="Say hello.", max_tokens=3)
    assert out.model == "prefs"


def test_cancel_mid_run_shows_progress_then_cancels_without_registering(server):
    r = submit(server, name="long", data=SFT_ROWS, config={**CONFIG, "max_steps": 500})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    # a second job for the same name while the first trains: 409
    assert_error(submit(server, name="long", data=SFT_ROWS), 409, "name", "job_conflict")

    # follow it live over SSE until the first progress event
    with httpx.stream(
        "GET",
        f"{server.url}/train/jobs/{job_id}/events",
        headers={"Accept": "text/event-stream"},
        timeout=WAIT_S,
    ) as stream:
        event = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: ") and event == "progress":
                first = json.loads(line[len("data: ") :])
                break
    assert first["step"] >= 1 and first["total_steps"] == 500

    running = wait_for(lambda: (rec := job(server, job_id))["step"] >= 1 and rec)
    assert running["state"] == "running" and running["total_steps"] == 500
    assert 0 < running["progress"] < 1 and running["eta_s"] is not None
    assert running["loss_history"] and running["loss"] is not None

    r = httpx.delete(f"{server.url}/train/jobs/{job_id}")
    assert r.status_code == 200, r.text
    record, _ = wait_settled(server, job_id)

    assert record["state"] == "cancelled" and record["step"] < 500
    assert not record["registered"]
    assert "long" not in adapter_names(server) and "long" not in model_ids(server)
    assert httpx.delete(f"{server.url}/train/jobs/{job_id}").json()["state"] == "cancelled"


def test_cancel_during_the_final_eval_stops_it_and_registers_nothing(server):
    # 96 rows, half held out: after 2 steps the eval generates 96 answers of up to 400
    # tokens (the random tiny model rarely stops early), far longer than a cancel takes.
    rows = SFT_ROWS * 12
    config = {
        **CONFIG,
        "max_steps": 2,
        "eval_fraction": 0.5,
        "eval_max_examples": 48,
        "eval_max_new_tokens": 400,
    }
    r = submit(server, name="eval-cut", data=rows, config=config)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]

    # the job reports its eval phase (after the last step); cancel then
    evaluating = wait_for(lambda: (rec := job(server, job_id))["phase"] == "eval" and rec)
    assert evaluating["state"] == "running" and evaluating["step"] == 2
    assert evaluating["eval_total"] == 96 and evaluating["eval_done"] < 96
    r = httpx.delete(f"{server.url}/train/jobs/{job_id}")
    assert r.status_code == 200, r.text
    record, _ = wait_settled(server, job_id)

    assert record["state"] == "cancelled" and not record["registered"]
    assert record["phase"] == "eval" and record["eval_done"] < 96  # stopped mid-eval
    assert "eval-cut" not in adapter_names(server) and "eval-cut" not in model_ids(server)
    trained = server.data_dir / "trained"
    assert not (trained / "eval-cut").exists()
    assert not list(trained.glob(".eval-cut*")), "temp folders left behind"
    events = httpx.get(f"{server.url}/train/jobs/{job_id}/events").json()["data"]
    types = [e["type"] for e in events]
    assert "cancel_requested" in types and "registered" not in types
    assert events[-1]["type"] == "state" and events[-1]["state"] == "cancelled"


def test_bad_requests_are_refused_before_training(server, tiny_model_path, tmp_path):
    before = len(httpx.get(f"{server.url}/train/jobs").json()["data"])
    good = SFT_ROWS[:2]

    # malformed JSONL: inline, and as an upload (the message names the file and the line)
    msg = assert_error(
        submit(server, name="x", data=[json.dumps(SFT_ROWS[0]), '{"messages": [oops']),
        400,
        "data",
        "invalid_data",
    )
    assert "line 2" in msg and "malformed JSON" in msg
    upload = (json.dumps(SFT_ROWS[0]) + "\n\n{not json\n").encode()
    r = httpx.post(
        f"{server.url}/train/sft",
        data={"name": "x"},
        files={"file": ("mine.jsonl", upload, "application/jsonl")},
    )
    msg = assert_error(r, 400, "data", "invalid_data")
    assert "mine.jsonl" in msg and "line 3" in msg

    # missing fields: the request's and the records'
    assert_error(submit(server, data=good), 400, "name", "invalid_request")
    assert_error(submit(server, name="x"), 400, "data")
    assert_error(submit(server, name="x", data=good, data_path="/tmp/a.jsonl"), 400, "data")
    msg = assert_error(submit(server, name="x", data=[{"text": "hi"}]), 400, "data")
    assert "line 1" in msg
    r = httpx.post(f"{server.url}/train/sft", files={"name": (None, "x")})
    assert_error(r, 400, "file")
    # empty dataset: the documented schema says at least one record
    assert "at least 1" in assert_error(submit(server, name="x", data=[]), 400, "data")
    # roles out of order: the assistant speaks first
    swapped = {"messages": [SFT_ROWS[0]["messages"][1], SFT_ROWS[0]["messages"][0]]}
    msg = assert_error(submit(server, name="x", data=[SFT_ROWS[1], swapped]), 400, "data")
    assert "line 2" in msg
    # SFT data sent to DPO
    assert "line 1" in assert_error(submit(server, "dpo", name="x", data=good), 400, "data")
    # a data_path that does not exist
    assert_error(submit(server, name="x", data_path=str(tmp_path / "nope.jsonl")), 400, "data")

    # hyper-parameters out of range, unknown ones, a bad config form field
    for field, value in (("r", 0), ("learning_rate", 5), ("max_steps", 0), ("batch_size", -1)):
        msg = assert_error(
            submit(server, name="x", data=good, config={**CONFIG, field: value}),
            400,
            f"config.{field}",
            "invalid_config",
        )
        assert field in msg
    assert "valid fields" in assert_error(
        submit(server, name="x", data=good, config={"rank": 4}), 400, "config.rank"
    )
    # trainable token rows: the shape of the value, then each token against the tokenizer
    for value, needle in (
        ("all", "'auto', 'none'"),
        (["<no_such_token>"], "not a token of this tokenizer"),
        ([10**6], "out of range"),
    ):
        msg = assert_error(
            submit(server, name="x", data=good, config={**CONFIG, "trainable_tokens": value}),
            400,
            "config.trainable_tokens",
            "invalid_config",
        )
        assert needle in msg
    r = httpx.post(
        f"{server.url}/train/sft",
        data={"name": "x", "config": "{r: 4"},
        files={"file": ("d.jsonl", json.dumps(good[0]).encode())},
    )
    assert_error(r, 400, "config")
    # an unsafe name
    assert_error(submit(server, name="../etc", data=good), 400, "name")

    # a different base model: 400, the server's own base is named in the message
    other = tmp_path / "other-model"
    other.mkdir()
    msg = assert_error(
        submit(server, name="x", data=good, config={**CONFIG, "base_model": str(other)}),
        400,
        "config.base_model",
        "base_model_mismatch",
    )
    assert str(tiny_model_path) in msg
    # a bundled model by its short name is another base too (and converts nothing)
    for bundled in ("gemma3-270m", "smollm2-135m-instruct", "bundled"):
        assert_error(
            submit(server, name="x", data=good, config={**CONFIG, "base_model": bundled}),
            400,
            "config.base_model",
            "base_model_mismatch",
        )

    # a name already registered as an adapter: 409 unless replace is asked
    adapter = build_lora_adapter(tiny_model_path, tmp_path / "taken", seed=3)
    r = httpx.post(f"{server.url}/adapters", json={"name": "taken", "path": str(adapter)})
    assert r.status_code == 201, r.text
    assert_error(submit(server, name="taken", data=good), 409, "name", "adapter_exists")

    # unknown job ids: 404 on every route
    for method, path in (
        ("GET", "/train/jobs/20990101-000000-deadbeef"),
        ("DELETE", "/train/jobs/20990101-000000-deadbeef"),
        ("GET", "/train/jobs/20990101-000000-deadbeef/events"),
        ("GET", "/train/jobs/..%2F..%2Fetc/events"),
    ):
        r = httpx.request(method, f"{server.url}{path}")
        assert r.status_code == 404, (path, r.text)
        assert r.json()["error"]["code"] in ("job_not_found", "not_found")

    # nothing above started a job
    assert len(httpx.get(f"{server.url}/train/jobs").json()["data"]) == before


def test_compare_trains_each_method_registers_and_measures_serving(server):
    """POST /train/compare: one job per method, each registered, then 8 streams on each
    adapter and the base; a refused method is a 400 naming it, with nothing queued."""
    before = len(httpx.get(f"{server.url}/train/jobs").json()["data"])
    body = {
        "name": "cmpx",
        "methods": ["lora", "sgd"],
        "data": SFT_ROWS,
        "eval_data": SFT_ROWS[:2],
        "config": {"max_steps": 2, "max_length": 128, "eval_max_examples": 1},
    }
    r = httpx.post(f"{server.url}/train/compare", json=body, timeout=60)
    assert "sgd" in assert_error(r, 400, param="methods")
    body["methods"] = ["lora", "prompt_tuning"]
    body["method_config"] = {"prompt_tuning": {"num_virtual_tokens": 400}}
    r = httpx.post(f"{server.url}/train/compare", json=body, timeout=60)
    assert "method prompt_tuning" in assert_error(r, 400, param="config.num_virtual_tokens")
    r = httpx.post(f"{server.url}/train/compare", json={**body, "eval_data": None}, timeout=60)
    assert_error(r, 400, param="eval_data")
    assert len(httpx.get(f"{server.url}/train/jobs").json()["data"]) == before

    body["method_config"] = {"prompt_tuning": {"num_virtual_tokens": 4}}
    r = httpx.post(f"{server.url}/train/compare", json=body, timeout=60)
    assert r.status_code == 202, r.text
    cmp = r.json()
    assert cmp["state"] == "running" and set(cmp["jobs"]) == {"lora", "prompt_tuning"}

    def done():
        got = httpx.get(f"{server.url}/train/compare/{cmp['id']}", timeout=30).json()
        return got if got["state"] == "done" else None

    got = wait_for(done, timeout_s=2 * WAIT_S)
    rows = {r["label"]: r for r in got["rows"]}
    assert set(rows) >= {"lora", "prompt_tuning"}
    for m in ("lora", "prompt_tuning"):
        row = rows[m]
        assert row["state"] == "succeeded" and row["registered"], row
        assert row["trainable"] > 0 and row["eval_loss"] is not None
        # every kind the trainer writes is served: a number, or the server's reason
        assert row["serving_tok_s"] is not None or row["serving_note"].startswith("not served")
    assert rows["lora"]["serving_tok_s"] > 0
    base = next(r for r in got["rows"] if r["label"].startswith("base"))
    assert base["serving_tok_s"] > 0
    assert "| `prompt_tuning` |" in got["markdown"]
    assert {"cmpx-lora", "cmpx-prompt-tuning"} <= set(adapter_names(server))
    report = httpx.get(f"{server.url}/train/compare/{cmp['id']}/report", timeout=30)
    assert report.status_code == 200 and "Serving tokens/s" in report.text
    listed = httpx.get(f"{server.url}/train/compare", timeout=30).json()["data"]
    assert cmp["id"] in [c["id"] for c in listed]
    assert_error(httpx.get(f"{server.url}/train/compare/cmp-nope", timeout=30), 404)


def test_restart_lists_old_jobs_and_interrupts_the_running_one(server, tiny_model_path):
    # a job that is running when the server stops ends 'interrupted', not lost
    r = submit(server, name="cut-short", data=SFT_ROWS, config={**CONFIG, "max_steps": 500})
    assert r.status_code == 202, r.text
    cut = r.json()["id"]
    wait_for(lambda: job(server, cut)["step"] >= 1)
    old_jobs = {j["id"]: j for j in httpx.get(f"{server.url}/train/jobs").json()["data"]}
    old_adapters = adapter_names(server)
    server.stop()

    # and one whose server died outright (record still 'running', worker gone)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    crashed = server.data_dir / "train" / "20000101-000000-crashed0"
    crashed.mkdir(parents=True)
    write_record(
        crashed,
        {
            **{k: v for k, v in old_jobs[cut].items() if k not in ("object", "registered")},
            "id": crashed.name,
            "name": "crashed",
            "state": "running",
            "pid": dead.pid,
            "created_at": 1.0,
        },
    )

    again = start_live_server(
        base_model=str(tiny_model_path),
        quantization="none",
        max_model_len=256,
        default_max_tokens=16,
        data_dir=server.data_dir,
    )
    try:
        jobs = {j["id"]: j for j in httpx.get(f"{again.url}/train/jobs").json()["data"]}
        assert set(old_jobs) <= set(jobs)
        assert jobs[cut]["state"] == "interrupted" and jobs[cut]["error"]
        assert jobs[crashed.name]["state"] == "interrupted"
        for job_id, old in old_jobs.items():
            if old["state"] in TERMINAL:
                assert jobs[job_id]["state"] == old["state"]
        assert adapter_names(again) == old_adapters
        assert "cut-short" not in adapter_names(again)
    finally:
        again.stop()


def test_cli_train_subcommand_returns_its_exit_code(tiny_model_path, tmp_path, capsys):
    from server.cli import main

    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in SFT_ROWS))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(SFT_ROWS[0]) + "\n{oops\n")
    common = ["--name", "x", "--base", str(tiny_model_path), "--dry-run"]

    assert main(["train", "sft", "--data", str(good), *common]) == 0
    assert "carry loss" in capsys.readouterr().out
    assert main(["train", "sft", "--data", str(bad), *common]) == 2
    assert "line 2" in capsys.readouterr().err
