"""Shared fixtures: tiny random models built once per session, and live servers on
loopback ports (the real uvicorn, the real app) driven by the real `openai` SDK."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.support import LiveServer, start_live_server  # noqa: E402
from tests.tiny_model import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with tied embeddings and a ChatML template: the bundled SmolLM2's
    architecture, as tiny_model_path is the bundled Gemma's."""
    return build_tiny_model(
        tmp_path_factory.mktemp("tiny-llama"), arch="llama", tie_word_embeddings=True
    )


@pytest.fixture(scope="session", params=["gemma", "llama"])
def tiny_arch_path(request: pytest.FixtureRequest) -> Path:
    """Each tiny architecture in turn (Gemma 3, Llama), for the checks both must pass."""
    name = "tiny_model_path" if request.param == "gemma" else "tiny_llama_path"
    return request.getfixturevalue(name)


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
