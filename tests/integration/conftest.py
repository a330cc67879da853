"""The real server, started as a user starts it (`python -m server.cli serve`), on a
bundled model in NF4, on a loopback port: Gemma 3 270M for most of these tests (the figures
the README quotes were measured on it), SmolLM2-135M-Instruct (the default) for its own."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]
GEMMA = "gemma3-270m"  # SWAPSERVE_BASE_MODEL of bundled_server
SMOLLM2 = "smollm2-135m-instruct"


class ServerProcess:
    def __init__(self, env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.env = env  # a second server on the same SWAPSERVE_DATA_DIR sees the same state
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--port", str(self.port)],
            cwd=ROOT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout_s: float = 900) -> ServerProcess:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()

    def openai(self):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="test", max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def bundled_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The server on the bundled Gemma 3 270M."""
    data = tmp_path_factory.mktemp("bundled-data")
    env = {"SWAPSERVE_DATA_DIR": str(data), "SWAPSERVE_BASE_MODEL": GEMMA}
    server = ServerProcess(env, data / "server.log")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def smollm2_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The server on the bundled SmolLM2-135M-Instruct (the default base)."""
    data = tmp_path_factory.mktemp("smollm2-data")
    env = {"SWAPSERVE_DATA_DIR": str(data), "SWAPSERVE_BASE_MODEL": SMOLLM2}
    server = ServerProcess(env, data / "server.log")
    try:
        yield server.wait_ready()
    finally:
        server.stop()
