"""Retrieval for the server: one CollectionStore per process, behind asyncio.

The routes (the /rag admin routes, and chat/completions with a `rag` object) reach the
`rag` package only through this service. Everything in `rag` blocks (SQLite, FAISS, the
embedding model), so every call runs in a worker thread; the event loop keeps streaming
tokens to other clients meanwhile.

The embedding model is loaded on first use, not at start-up: the server is ready as soon
as the base model is, and a server that never sees a RAG request never pays the ~2-20 s
(and ~100 MB) of loading sentence-transformers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np

from rag.collection import Hit, IndexConfig
from rag.embeddings import EmbedderLike, ProgressFn, get_embedder, model_label
from rag.errors import RAGError
from rag.prompt import augment_messages, build_prompt, citations, last_user_text
from rag.store import CollectionStore
from server.errors import APIError
from server.protocol import Citation, RAGOptions

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

# rag's error params, renamed to the request fields a chat/completions caller sent
_RAG_PARAMS = {
    "name": "rag.collection",
    "top_k": "rag.top_k",
    "min_score": "rag.min_score",
    "filter": "rag.filter",
}


class LazyEmbedder:
    """An `EmbedderLike` that loads the real model the first time it is used.

    The store and its collections only touch the embedder inside worker threads, so the
    load happens there too, never on the event loop.
    """

    def __init__(self, model_path: Path | None) -> None:
        self.model_path = model_path
        self._model: EmbedderLike | None = None
        self._lock = threading.Lock()

    def get(self) -> EmbedderLike:
        with self._lock:  # one load, however many requests arrive together
            if self._model is None:
                try:
                    self._model = get_embedder(self.model_path)
                except Exception as exc:
                    # A server-side configuration problem, not the caller's: 503, and the
                    # next request tries again (the folder may have been fixed).
                    logger.exception("cannot load the embedding model")
                    raise APIError(
                        503,
                        f"the embedding model could not be loaded ({exc}); check "
                        "SWAPSERVE_EMBEDDER",
                        code="embedder_unavailable",
                    ) from exc
            return self._model

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def model_id(self) -> str:
        """The `model` id /v1/embeddings answers to, known without loading the model."""
        return model_label(self.model_path)

    @property
    def name(self) -> str:
        return self.get().name

    @property
    def dim(self) -> int:
        return self.get().dim

    @property
    def max_seq_length(self) -> int:
        return self.get().max_seq_length

    def count_tokens(self, text: str) -> int:
        return self.get().count_tokens(text)

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return self.get().token_spans(text)

    def embed(
        self, texts: Sequence[str], batch_size: int = 32, progress: ProgressFn | None = None
    ) -> np.ndarray:
        return self.get().embed(texts, batch_size=batch_size, progress=progress)

    def embed_query(self, text: str) -> np.ndarray:
        return self.get().embed_query(text)

    # what /v1/embeddings needs beyond EmbedderLike (the real Embedder has it)
    @property
    def vocab_size(self) -> int:
        return int(self.get().vocab_size)  # type: ignore[attr-defined]

    @property
    def special_tokens(self) -> int:
        return int(self.get().special_tokens)  # type: ignore[attr-defined]

    def input_length(self, text: str) -> int:
        return int(self.get().input_length(text))  # type: ignore[attr-defined]

    def embed_token_ids(self, inputs: Sequence[Sequence[int]]) -> np.ndarray:
        return self.get().embed_token_ids(inputs)  # type: ignore[attr-defined]


class RetrievalService:
    """The process's collections, and the retrieve-then-augment step of chat/completions."""

    def __init__(
        self,
        root: Path,
        *,
        embedder_path: Path | None = None,
        max_doc_bytes: int,
        approx_threshold: int,
        max_docs_per_request: int = 10_000,
    ) -> None:
        self.max_docs_per_request = max_docs_per_request
        self.embedder = LazyEmbedder(embedder_path)
        self.store = CollectionStore(
            root,
            self.embedder,
            max_doc_bytes=max_doc_bytes,
            index_config=IndexConfig(approx_threshold=approx_threshold),
        )

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a blocking `rag` call in a worker thread."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    def close(self) -> None:
        self.store.close()

    def recover(self) -> list[str]:
        """Quarantine broken collections at start-up (see CollectionStore.recover)."""
        return self.store.recover()

    # --- chat and completions -----------------------------------------------------------

    async def retrieve(self, opts: RAGOptions, query: str, *, query_param: str) -> list[Hit]:
        """Search `opts.collection` for `query`; errors name the request field at fault."""
        try:
            return await self.run(
                self.store.search,
                opts.collection,
                query,
                top_k=opts.top_k,
                min_score=opts.min_score,
                filter=opts.filter,
            )
        except RAGError as exc:
            param = (
                query_param if exc.param == "query" else _RAG_PARAMS.get(exc.param or "", exc.param)
            )
            raise APIError(exc.status, exc.message, param=param, code=exc.code) from exc

    async def augment_chat(
        self, opts: RAGOptions, messages: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[Citation]]:
        """Retrieve for the last user message; put the passages into the prompt."""
        try:
            query = last_user_text(messages)
        except RAGError as exc:
            raise APIError(400, exc.message, param="messages", code=exc.code) from exc
        hits = await self.retrieve(opts, query, query_param="messages")
        logger.info("rag: %d passages from %s for chat", len(hits), opts.collection)
        return augment_messages(messages, hits, mode=opts.mode), _citations(hits)

    async def augment_prompt(self, opts: RAGOptions, prompt: str) -> tuple[str, list[Citation]]:
        """Retrieve for a completions prompt; wrap it as instructions + passages + question."""
        hits = await self.retrieve(opts, prompt, query_param="prompt")
        logger.info("rag: %d passages from %s for completion", len(hits), opts.collection)
        # With nothing retrieved the prompt is left as the caller wrote it.
        return (build_prompt(prompt, hits) if hits else prompt), _citations(hits)


def _citations(hits: Sequence[Hit]) -> list[Citation]:
    return [Citation.model_validate(c) for c in citations(hits)]
