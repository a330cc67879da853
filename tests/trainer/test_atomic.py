"""Atomic record writes: a kill -9 at any instant leaves the old record or the new one."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.atomic import write_json_atomic

# Alternates between two records large enough (several pages) that a torn write would
# be caught mid-way by a kill.
WRITER = """
import sys
from pathlib import Path
from trainer.atomic import write_json_atomic
path = Path(sys.argv[1])
i = 0
print("ready", flush=True)
while True:
    tag = "ab"[i % 2]
    write_json_atomic(path, {"tag": tag, "body": tag * 200_000})
    i += 1
"""


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_write_replaces_whole_record_and_cleans_up(tmp_path):
    path = tmp_path / "sub" / "rec.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"b": [1, 2]}, mode=0o600)
    assert _read(path) == {"b": [1, 2]}
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in path.parent.iterdir()] == ["rec.json"]


def test_failed_write_leaves_the_old_record(tmp_path):
    path = tmp_path / "rec.json"
    write_json_atomic(path, {"a": 1})
    loop: dict = {}
    loop["self"] = loop  # json cannot serialise a cycle
    with pytest.raises(ValueError):
        write_json_atomic(path, loop)
    assert _read(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["rec.json"]


def test_kill_9_mid_write_never_leaves_a_torn_record(tmp_path):
    path = tmp_path / "rec.json"
    write_json_atomic(path, {"tag": "a", "body": "a" * 200_000})
    rng = random.Random(7)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    for _ in range(8):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, env=env
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.01, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        rec = _read(path)  # raises on a torn file
        assert rec["tag"] in ("a", "b")
        assert rec["body"] == rec["tag"] * 200_000
    # leftovers of killed writes are temp files, never something that reads as a record
    assert {p.name for p in tmp_path.iterdir() if not p.name.endswith(".tmp")} == {"rec.json"}
