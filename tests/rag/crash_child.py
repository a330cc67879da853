"""Child process for the crash-safety test: adds one batch to a collection and is
SIGKILLed by the parent at the point named in SWAPSERVE_RAG_TEST_PAUSE_AT."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rag.collection import Collection, DocumentInput  # noqa: E402
from tests.rag.fake_embedder import FakeEmbedder  # noqa: E402

BATCH_2 = [DocumentInput(f"new{i}", f"volcano lava eruption number {i}") for i in range(5)]
# Replaces one old document: a half-applied replace would show up as a duplicate or a gap.
BATCH_2.append(DocumentInput("old0", "volcano replaced text"))

if __name__ == "__main__":
    with Collection.open(sys.argv[1], FakeEmbedder()) as c:
        c.add_documents(BATCH_2)
    print("finished", flush=True)
