"""Job records and event logs on disk, shared by the JobManager (parent) and the worker.

A job lives in ``<root>/<job_id>/``: ``job.json`` (the record, replaced atomically),
``events.jsonl`` (appended), ``data.jsonl`` (a copy of the submitted data), ``worker.log``
and, while a cancel is pending, a ``cancel`` flag file.

Who writes ``job.json``: the parent before the worker starts and after it exits, the
worker in between. Their lifetimes do not overlap, so no lock is needed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from trainer.atomic import write_json_atomic

RECORD = "job.json"
EVENTS = "events.jsonl"
CANCEL_FLAG = "cancel"
WORKER_LOG = "worker.log"

STATES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")
TERMINAL = frozenset({"succeeded", "failed", "cancelled", "interrupted"})


def read_record(job_dir: Path) -> dict[str, Any]:
    return json.loads((job_dir / RECORD).read_text())


def write_record(job_dir: Path, record: dict[str, Any]) -> None:
    record["updated_at"] = time.time()
    write_json_atomic(job_dir / RECORD, record)


def append_event(job_dir: Path, kind: str, **fields: Any) -> None:
    """One JSON line per event; a single short write with O_APPEND, so the parent and
    the worker can both append without interleaving lines."""
    line = json.dumps({"time": time.time(), "type": kind, **fields}, default=str) + "\n"
    fd = os.open(job_dir / EVENTS, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_events(job_dir: Path, since: int = 0) -> list[dict[str, Any]]:
    """Events with sequence number >= ``since`` (the sequence is the line index)."""
    path = job_dir / EVENTS
    if not path.is_file():
        return []
    out = []
    with open(path) as fh:
        for seq, line in enumerate(fh):
            if seq < since or not line.endswith("\n"):  # skip a line still being written
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            event["seq"] = seq
            out.append(event)
    return out
