"""Durable, all-or-nothing writes of small records (JSON files the server and trainer keep).

Write to a temporary file in the same folder, fsync it, rename it over the target, then
fsync the folder so the rename itself survives a power cut. A reader, or a process started
after a `kill -9` at any instant, sees the old record or the new one, never half of one.

It lives in trainer/ because the server may import trainer/ but not the other way round:
the one place both can reach (as the base-model loader does).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Replace `path` with `data` atomically and durably; `mode` sets its permissions
    before it becomes visible (e.g. 0o600 for a file of key hashes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(
    path: Path, obj: Any, *, indent: int | None = 1, mode: int | None = None
) -> None:
    """`obj` as JSON (values JSON cannot hold written with str()), atomically."""
    text = json.dumps(obj, indent=indent, default=str)
    write_bytes_atomic(path, (text + "\n").encode(), mode=mode)
