"""Shared fixtures: a tiny random model built once per session, and live servers on
loopback ports (the real uvicorn, the real app) driven by the real `openai` SDK."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

from support import free_port  # noqa: E402
from tiny_model import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


class LiveServer:
    """The real app under the real uvicorn, in a thread of this process."""

    def __init__(self, app, port: int):
        import uvicorn

        self.app = app
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout_s: float = 120) -> LiveServer:
        import httpx

        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"{self.url}/ready", timeout=2)
                if r.status_code == 200:
                    return self
                if r.json().get("status") == "failed":
                    raise RuntimeError(r.text)
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError("server did not become ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def openai(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="test", max_retries=0, **kwargs)


def start_live_server(**settings_kwargs) -> LiveServer:
    from server.app import create_app
    from server.config import Settings

    port = free_port()
    settings = Settings(port=port, **settings_kwargs)
    return LiveServer(create_app(settings), port).start()


@pytest.fixture(scope="session")
def tiny_server(
    tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    server = start_live_server(
        base_model=str(tiny_model_path),
        quantization="none",
        max_model_len=256,
        default_max_tokens=16,
        max_body_bytes=64 * 1024,
        data_dir=tmp_path_factory.mktemp("data"),
    )
    yield server
    server.stop()
