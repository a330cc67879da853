import json
import subprocess
import sys
import time

import pytest

from tests.trainer.helpers import write_jsonl
from trainer.config import ConfigError
from trainer.data import DataError
from trainer.jobs import JobConflict, JobManager, JobNotFound, JobStateError
from trainer.records import read_events, write_record

WAIT_S = 240


def job_config(tiny_model_dir, **overrides) -> dict:
    fields = {
        "base_model": str(tiny_model_dir),
        "quantization": "none",
        "device": "cpu",
        "r": 4,
        "learning_rate": 1e-2,
        "max_steps": 3,
        "batch_size": 4,
        "max_length": 128,
        "eval_fraction": 0.0,
    }
    fields.update(overrides)
    return fields


@pytest.fixture
def manager(tmp_path):
    registered = []
    jm = JobManager(tmp_path / "jobs", on_success=registered.append, poll_interval_s=0.2)
    jm.registered = registered
    yield jm
    jm.close()


def wait_for(predicate, timeout_s=WAIT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError("condition not met in time")


def test_submit_runs_to_success_then_a_bad_job_fails_in_its_worker(
    manager, tiny_model_dir, sft_data, tmp_path
):
    good = manager.submit("sft", job_config(tiny_model_dir), sft_data, "house-style")
    # Passes the structural check at submit, fails the token-length check in the worker.
    long_prompt = {
        "messages": [
            {"role": "user", "content": " ".join(["hello world"] * 80)},
            {"role": "assistant", "content": "hi"},
        ]
    }
    bad_data = write_jsonl(tmp_path / "long.jsonl", [long_prompt])
    bad = manager.submit("sft", job_config(tiny_model_dir), bad_data, "too-long")
    assert manager.get(bad)["state"] == "queued"  # max_running=1: it waits its turn

    record = manager.wait(good, timeout_s=WAIT_S)
    assert record["state"] == "succeeded", record.get("error")
    assert record["step"] == record["total_steps"] == 3
    assert record["progress"] == 1.0 and record["eta_s"] == 0
    assert [h["step"] for h in record["loss_history"]] == [1, 2, 3]
    assert record["started_at"] <= record["finished_at"]
    assert record["result"]["final_loss"] == record["loss_history"][-1]["loss"]
    out = manager.adapters_dir / "house-style"
    assert record["output_dir"] == str(out)
    assert (out / "adapter_model.safetensors").is_file() and (out / "swapserve_card.json").is_file()
    assert record["notified"] and record["registration_error"] is None
    assert [r["id"] for r in manager.registered] == [good]
    kinds = [(e["type"], e.get("state")) for e in manager.events(good)]
    assert kinds[0] == ("state", "queued") and ("state", "succeeded") in kinds
    assert sum(1 for k, _ in kinds if k == "progress") == 3
    assert manager.events(good, since=len(kinds) - 1)[0]["seq"] == len(kinds) - 1

    record = manager.wait(bad, timeout_s=WAIT_S)
    assert record["state"] == "failed" and record["error_type"] == "data"
    assert record["problems"][0]["line"] == 1 and "max_length" in record["error"]
    assert not (manager.adapters_dir / "too-long").exists()
    assert [j["id"] for j in manager.list()] == [good, bad]


def test_cancel_running_and_queued_jobs(manager, tiny_model_dir, sft_data):
    running = manager.submit("sft", job_config(tiny_model_dir, max_steps=500), sft_data, "long")
    queued = manager.submit("sft", job_config(tiny_model_dir), sft_data, "second")
    with pytest.raises(JobConflict, match="already training"):
        manager.submit("sft", job_config(tiny_model_dir), sft_data, "long")

    assert manager.cancel(queued)["state"] == "cancelled"
    wait_for(lambda: manager.get(running)["step"] >= 1)
    manager.cancel(running)
    record = manager.wait(running, timeout_s=WAIT_S)

    assert record["state"] == "cancelled"
    assert 1 <= record["step"] < 500
    assert not (manager.adapters_dir / "long").exists()
    leftovers = list(manager.adapters_dir.glob(".*")) if manager.adapters_dir.exists() else []
    assert leftovers == []
    assert manager.registered == []
    assert manager.get(queued)["pid"] is None  # never started
    assert manager.cancel(running)["state"] == "cancelled"  # idempotent


def test_recover_marks_dead_running_jobs_interrupted(tmp_path):
    root = tmp_path / "jobs"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for job_id, state in (("job-running", "running"), ("job-done", "succeeded")):
        (root / job_id).mkdir(parents=True)
        write_record(
            root / job_id,
            {
                "id": job_id,
                "name": job_id,
                "kind": "sft",
                "state": state,
                "pid": dead.pid,
                "output_dir": str(tmp_path / "trained" / job_id),
                "created_at": time.time(),
                "notified": False,
            },
        )
    notified = []
    jm = JobManager(root, on_success=notified.append)
    try:
        assert jm.recover() == ["job-running"]
        record = jm.get("job-running")
        assert record["state"] == "interrupted" and record["finished_at"]
        assert [e["state"] for e in read_events(root / "job-running")] == ["interrupted"]
        # a job that finished while no server listened is handed to on_success now
        assert [r["id"] for r in notified] == ["job-done"]
        assert jm.get("job-done")["notified"] is True
        assert jm.recover() == []  # idempotent
    finally:
        jm.close()


def test_submit_validates_before_queueing(manager, tiny_model_dir, sft_data, dpo_data, tmp_path):
    with pytest.raises(ConfigError, match="name"):
        manager.submit("sft", job_config(tiny_model_dir), sft_data, "../escape")
    with pytest.raises(ConfigError, match="unknown field"):
        manager.submit("sft", {"rank": 8}, sft_data, "x")
    with pytest.raises(ConfigError, match="kind"):
        manager.submit("ppo", {}, sft_data, "x")
    with pytest.raises(DataError, match="line 1"):
        manager.submit("sft", job_config(tiny_model_dir), dpo_data, "x")
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"messages": ['])
    with pytest.raises(DataError) as info:
        manager.submit("sft", job_config(tiny_model_dir), bad, "x")
    assert info.value.problems[0].line == 1
    (manager.adapters_dir / "taken").mkdir(parents=True)
    with pytest.raises(JobConflict, match="already exists"):
        manager.submit("sft", job_config(tiny_model_dir), sft_data, "taken")
    with pytest.raises(JobNotFound):
        manager.get("nope")
    with pytest.raises(JobNotFound):
        manager.get("../../etc")
    assert manager.list() == []


def test_cancel_finished_job_is_a_state_error(tmp_path):
    root = tmp_path / "jobs"
    (root / "job-1").mkdir(parents=True)
    write_record(
        root / "job-1", {"id": "job-1", "name": "a", "state": "succeeded", "created_at": 1}
    )
    jm = JobManager(root)
    with pytest.raises(JobStateError, match="already succeeded"):
        jm.cancel("job-1")
    assert json.loads((root / "job-1" / "job.json").read_text())["state"] == "succeeded"
