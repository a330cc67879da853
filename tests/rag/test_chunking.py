from __future__ import annotations

import pytest

from rag.chunking import ChunkingConfig, chunk_text
from rag.errors import InvalidArgument, InvalidDocument

MARKDOWN = (
    "# Guide\n\n## Install\n\n"
    + " ".join(f"Step {i} installs package number {i} on the server." for i in range(60))
    + "\n\n## Usage\n\nRun the server. Then call it.\n\n"
    + "\n\n".join(f"Paragraph {i} explains option {i} in some detail." for i in range(30))
)


def test_chunks_fit_token_budget_and_slice_the_document(real_embedder):
    cfg = ChunkingConfig(chunk_tokens=64, overlap=16)
    chunks = chunk_text("guide.md", MARKDOWN, real_embedder, cfg, {"lang": "en"})
    assert len(chunks) > 5
    for i, c in enumerate(chunks):
        assert c.index == i and c.doc_id == "guide.md" and c.metadata == {"lang": "en"}
        assert MARKDOWN[c.char_start : c.char_end] == c.text
        # Counted again with the real tokenizer: never over the budget.
        assert real_embedder.count_tokens(c.text) <= 64
    # Everything non-blank is covered by some chunk.
    covered = set()
    for c in chunks:
        covered.update(range(c.char_start, c.char_end))
    assert all(i in covered for i, ch in enumerate(MARKDOWN) if not ch.isspace())


def test_headings_start_chunks_and_sentences_are_preferred(real_embedder):
    chunks = chunk_text("g", MARKDOWN, real_embedder, ChunkingConfig(chunk_tokens=64, overlap=16))
    starts = [c.text.split("\n")[0] for c in chunks]
    assert "## Usage" in starts
    # A title followed straight by a sub-heading is not a chunk of its own.
    assert chunks[0].text.startswith("# Guide\n\n## Install")
    # Cuts fall at sentence ends, not mid-sentence.
    assert all(c.text.rstrip().endswith((".", "Install")) for c in chunks)


def test_overlap_repeats_text_within_a_section(real_embedder):
    text = " ".join(f"Sentence {i} is here." for i in range(80))
    chunks = chunk_text("d", text, real_embedder, ChunkingConfig(chunk_tokens=40, overlap=12))
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert b.char_start < a.char_end  # overlapping spans
        assert b.char_start > a.char_start  # always advancing
    no_overlap = chunk_text("d", text, real_embedder, ChunkingConfig(chunk_tokens=40, overlap=0))
    assert all(a.char_end <= b.char_start for a, b in zip(no_overlap, no_overlap[1:], strict=False))


def test_budget_clamped_to_model_window(real_embedder):
    text = "word " * 2000
    chunks = chunk_text("d", text, real_embedder, ChunkingConfig(chunk_tokens=10_000, overlap=0))
    assert max(c.n_tokens for c in chunks) == real_embedder.max_seq_length - 2


def test_word_longer_than_budget_is_split(fake_embedder):
    # The fake tokenizer has one token per word; a long run of punctuation is many tokens.
    text = "!" * 100
    chunks = chunk_text("d", text, fake_embedder, ChunkingConfig(chunk_tokens=30, overlap=5))
    assert all(c.n_tokens <= 30 for c in chunks) and chunks[-1].char_end == 100


def test_bad_input(fake_embedder):
    with pytest.raises(InvalidDocument, match="empty"):
        chunk_text("d", " \n\t ", fake_embedder)
    with pytest.raises(InvalidArgument, match="overlap"):
        chunk_text("d", "text", fake_embedder, ChunkingConfig(chunk_tokens=20, overlap=15))
