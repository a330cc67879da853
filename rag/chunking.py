"""Split documents into chunks that fit the embedder's token window.

Tokens are counted with the embedder's own tokenizer (its character offsets tell us where
each token sits), so a chunk never gets silently truncated at embedding time. Cut points
are ranked: a Markdown heading (a new section: cut there, no overlap) > a paragraph break
> a sentence end or line break > a word boundary > anywhere (a single "word" longer than
the window). Consecutive chunks of one section overlap by up to ``overlap`` tokens, snapped
to a word boundary, so a fact that straddles a cut is whole in at least one chunk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from rag.embeddings import EmbedderLike
from rag.errors import InvalidArgument, InvalidDocument

# Cut-point ranks (higher is better).
_ANY, _WORD, _SENTENCE, _PARAGRAPH, _HEADING = 0, 1, 2, 3, 4

_HEADING_RE = re.compile(r"#{1,6}[ \t]")
_PARAGRAPH_RE = re.compile(r"\n[ \t]*\n")
_SENTENCE_END = (".", "!", "?", ":", ";", "。", "！", "？")

# Special tokens ([CLS], [SEP]) the model adds around every input.
_SPECIAL_TOKEN_ALLOWANCE = 2


@dataclass(frozen=True)
class Chunk:
    """One piece of a document: ``doc_text[char_start:char_end] == text``."""

    doc_id: str
    index: int
    text: str
    char_start: int
    char_end: int
    n_tokens: int
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ChunkingConfig:
    chunk_tokens: int = 200
    """Most tokens in a chunk; clamped to the embedder's window (minus special tokens)."""
    overlap: int = 32
    """Tokens repeated from the end of one chunk at the start of the next (same section)."""

    def validate(self) -> None:
        if self.chunk_tokens < 8:
            raise InvalidArgument("chunk_tokens must be >= 8", param="chunk_tokens")
        if not 0 <= self.overlap < self.chunk_tokens // 2:
            raise InvalidArgument(
                f"overlap must be between 0 and chunk_tokens/2 (got {self.overlap} for "
                f"chunk_tokens={self.chunk_tokens})",
                param="overlap",
            )


def effective_chunk_tokens(embedder: EmbedderLike, config: ChunkingConfig) -> int:
    return max(8, min(config.chunk_tokens, embedder.max_seq_length - _SPECIAL_TOKEN_ALLOWANCE))


def _rank_cuts(text: str, spans: list[tuple[int, int]]) -> list[int]:
    """rank[i] = how good it is to start a chunk at token i (cut between i-1 and i)."""
    ranks = [_HEADING] + [_ANY] * (len(spans) - 1)
    for i in range(1, len(spans)):
        prev_end, start = spans[i - 1][1], spans[i][0]
        gap = text[prev_end:start]
        if not gap:
            continue  # inside a word: "un" + "##believ" + "##able"
        line_start = text.rfind("\n", 0, start) + 1
        at_line_start = not text[line_start:start].strip()
        if at_line_start and _HEADING_RE.match(text, start):
            ranks[i] = _HEADING
        elif _PARAGRAPH_RE.search(gap):
            ranks[i] = _PARAGRAPH
        elif "\n" in gap or text[prev_end - 1 : prev_end] in _SENTENCE_END:
            ranks[i] = _SENTENCE
        else:
            ranks[i] = _WORD
    return ranks


def chunk_text(
    doc_id: str,
    text: str,
    embedder: EmbedderLike,
    config: ChunkingConfig | None = None,
    metadata: dict[str, Any] | None = None,
) -> list[Chunk]:
    """Chunks of ``text`` in document order, each at most the token budget."""
    config = config or ChunkingConfig()
    config.validate()
    if not text.strip():
        raise InvalidDocument(f"document {doc_id!r} is empty", param="text")
    budget = effective_chunk_tokens(embedder, config)
    overlap = min(config.overlap, budget // 2 - 1)
    spans = [s for s in embedder.token_spans(text) if s[1] > s[0]]
    if not spans:
        raise InvalidDocument(f"document {doc_id!r} has no tokens", param="text")
    ranks = _rank_cuts(text, spans)
    n = len(spans)
    meta = dict(metadata or {})

    bounds: list[tuple[int, int]] = []  # token [start, end) of each chunk
    start = 0
    while start < n:
        limit = min(start + budget, n)
        end = limit
        # A heading inside the window ends the chunk (sections stay apart), once the chunk
        # holds some body text: a title followed by a sub-heading is not a chunk of its own.
        heading = None
        has_body = ranks[start] != _HEADING
        for i in range(start + 1, limit):
            if ranks[i] == _HEADING and has_body:
                heading = i
                break
            has_body = has_body or ranks[i] in (_SENTENCE, _PARAGRAPH)
        if heading is not None:
            end = heading
        elif limit < n:
            # Best-ranked cut in the back half of the window (the latest of equal rank), so
            # chunks stay reasonably full.
            lo = start + max(1, (limit - start) // 2)
            best = max(range(lo, limit + 1), key=lambda i: (ranks[i] if i < n else 9, i))
            end = best
        bounds.append((start, end))
        if end >= n:
            break
        if ranks[end] == _HEADING or overlap == 0:
            start = end
        else:
            # Start the next chunk at most `overlap` tokens back, at the earliest sentence
            # start in that range, else the earliest word start; never mid-word, and always
            # past the previous start so the loop advances.
            window = range(max(end - overlap, start + 1), end)
            start = next(
                (i for i in window if ranks[i] >= _SENTENCE),
                next((i for i in window if ranks[i] >= _WORD), end),
            )

    chunks: list[Chunk] = []
    for idx, (s, e) in enumerate(bounds):
        cs, ce = spans[s][0], spans[e - 1][1]
        chunks.append(
            Chunk(
                doc_id=doc_id,
                index=idx,
                text=text[cs:ce],
                char_start=cs,
                char_end=ce,
                n_tokens=e - s,
                metadata=meta,
            )
        )
    return chunks
