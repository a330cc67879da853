"""Start `swapserve serve` as a child process on a free loopback port, for benchmarks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

# The base model the benchmarks load: the bundled Gemma 3 270M, on which the README's
# figures were measured, unless SWAPSERVE_BASE_MODEL names another (a bundled model's short
# name, such as smollm2-135m-instruct, the server's default, or a model folder).
BENCH_BASE = os.environ.get("SWAPSERVE_BASE_MODEL") or "gemma3-270m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(
    env: dict[str, str] | None = None, timeout_s: float = 600, python: str | None = None
) -> Iterator[str]:
    """``python``: another interpreter (e.g. .venv-vllm's for the vLLM engine)."""
    with server_process(env, timeout_s, python) as (url, _proc):
        yield url


@contextmanager
def server_process(
    env: dict[str, str] | None = None, timeout_s: float = 600, python: str | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """The server's URL and its process (e.g. to read the CPU time it spent). Its data
    directory is a fresh one unless ``env`` names one: a benchmark neither serves nor
    touches the adapters, keys and jobs of the user's own server."""
    port = free_port()
    scratch = tempfile.TemporaryDirectory(prefix="swapserve-bench-")
    child_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "SWAPSERVE_BASE_MODEL": BENCH_BASE,
        "SWAPSERVE_DATA_DIR": scratch.name,
        **(env or {}),
    }
    proc = subprocess.Popen(
        [
            python or sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--port",
            str(port),
            "--log-level",
            "WARNING",
        ],
        env=child_env,
        cwd=str(Path(__file__).resolve().parents[1]),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("server did not become ready")
            time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        scratch.cleanup()
