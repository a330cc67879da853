"""The examples in clients/examples/ run as a user runs them, against the real server on
the bundled model: train, register, ingest and an experiment with `clients` alone, and the
adapter switch with the openai SDK."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.integration.conftest import ROOT

pytestmark = pytest.mark.integration


def run_example(script: str, *args: str, cwd) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "clients" / "examples" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=1500,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_train_ingest_experiment(bundled_server, tmp_path):
    out = run_example(
        "train_ingest_experiment.py",
        "--url",
        bundled_server.url,
        "--steps",
        "2",
        "--questions",
        "2",
        cwd=tmp_path,
    )
    assert "ingested 12 notes" in out
    assert "search: ferry.md" in out
    assert "step 2/2" in out and "registered: True" in out
    assert "registered example-copy" in out
    assert "adapter+rag  token F1" in out
    assert (tmp_path / "example-report.html").read_text().count("<svg") >= 2


def test_switch_adapters(bundled_server, tmp_path):
    out = run_example("switch_adapters.py", "--url", bundled_server.url, cwd=tmp_path)
    assert "--- base: " in out
