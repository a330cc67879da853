"""A deterministic, dependency-free embedder for tests that don't need a real model.

Bag of words hashed into a small vector: texts that share words are close, so ranking and
filters can be tested without loading torch. Also used by the crash-test child process.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np

_WORD = re.compile(r"\w+|[^\w\s]")


class FakeEmbedder:
    def __init__(self, dim: int = 64, name: str = "fake-bow") -> None:
        self.dim = dim
        self.name = f"{name}-{dim}"
        self.max_seq_length = 128
        # what /v1/embeddings reads (server/serving/embeddings.py): any id is a "word" here
        self.vocab_size = 10**100
        self.special_tokens = 0

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in _WORD.finditer(text)]

    def count_tokens(self, text: str) -> int:
        return len(self.token_spans(text))

    def _vec(self, text: str) -> np.ndarray:
        v = np.zeros(self.dim, dtype=np.float32)
        for w in re.findall(r"\w+", text.lower()):
            h = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
            v[h % self.dim] += 1.0 if (h >> 32) & 1 else -1.0
        norm = np.linalg.norm(v)
        if norm == 0:
            v[0] = 1.0
            return v
        return v / norm

    def embed(self, texts: Sequence[str], batch_size: int = 32, progress=None) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            for i in range(start, min(start + batch_size, len(texts))):
                out[i] = self._vec(texts[i])
            if progress is not None:
                progress(min(start + batch_size, len(texts)), len(texts))
        return out

    def embed_query(self, text: str) -> np.ndarray:
        return self._vec(text)

    def input_length(self, text: str) -> int:
        return self.count_tokens(text)

    def embed_token_ids(self, inputs: Sequence[Sequence[int]]) -> np.ndarray:
        return self.embed([" ".join(f"t{i}" for i in ids) for ids in inputs])
