"""Training on the bundled model through the running server: POST /train/sft with the
example data, the job succeeds, and the adapter is served by name without a restart."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "trainer" / "examples"
WAIT_S = 600


def test_train_sft_on_bundled_model_then_serve_it_by_name(bundled_server):
    started = time.monotonic()
    r = httpx.post(
        f"{bundled_server.url}/train/sft",
        json={
            "name": "house-style",
            "data_path": str(EXAMPLES / "house_style_sft.jsonl"),
            # QLoRA (the server's NF4 base), two small steps and no eval: enough to prove
            # the path end to end on 2 shared CPU cores, not to teach the style. Measured
            # here: ~40 s a step at batch 4 under load, and the eval pass (eval loss on 18
            # examples + generation, base and adapter) took over 5 minutes.
            "config": {"max_steps": 2, "batch_size": 2, "max_length": 128, "eval_fraction": 0},
        },
        timeout=60,
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert r.json()["config"]["quantization"] == "nf4"

    deadline = time.monotonic() + WAIT_S
    while True:
        record = httpx.get(f"{bundled_server.url}/train/jobs/{job_id}", timeout=30).json()
        settled = record["state"] in ("failed", "cancelled", "interrupted") or (
            record["state"] == "succeeded" and record.get("notified")
        )
        if settled or time.monotonic() > deadline:
            break
        time.sleep(1)
    elapsed = time.monotonic() - started

    assert record["state"] == "succeeded", record
    assert record["registered"], record.get("registration_error")
    assert record["step"] == 2 and len(record["loss_history"]) == 2
    ids = [m.id for m in bundled_server.openai().models.list().data]
    assert "house-style" in ids
    answer = bundled_server.openai().chat.completions.create(
        model="house-style",
        messages=[{"role": "user", "content": "What is the capital of Italy?"}],
        max_tokens=24,
        temperature=0,
    )
    assert answer.model == "house-style"
    assert answer.choices[0].message.content
    print(
        f"\nbundled SFT job: {elapsed:.1f} s submit-to-registered, "
        f"{record['result']['wall_time_s']:.1f} s in the trainer, "
        f"loss {record['loss_history'][0]['loss']:.3f} -> {record['loss_history'][-1]['loss']:.3f}, "
        f"answer {answer.choices[0].message.content!r}"
    )
