"""`swapserve serve` with the tests' FakeEmbedder in place of sentence-transformers.

Everything else is the real server (server.cli's `serve`); only the embedding model is
swapped, as tests/rag does, so fault tests need not load all-MiniLM-L6-v2 in every
server process they start and kill. Usage: python serve_fake_embedder.py serve ARGS...
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import server.retrieval  # noqa: E402
from tests.rag.fake_embedder import FakeEmbedder  # noqa: E402

server.retrieval.get_embedder = lambda path=None: FakeEmbedder()  # type: ignore[assignment]

if __name__ == "__main__":
    from server.cli import main

    sys.exit(main())
