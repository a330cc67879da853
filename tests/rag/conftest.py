from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests.rag.fake_embedder import FakeEmbedder  # noqa: E402


@pytest.fixture(scope="session")
def real_embedder():
    """The bundled all-MiniLM-L6-v2, loaded once per session (about 10 s on 2 cores)."""
    from rag.embeddings import get_embedder

    return get_embedder()


@pytest.fixture
def fake_embedder() -> FakeEmbedder:
    return FakeEmbedder()
