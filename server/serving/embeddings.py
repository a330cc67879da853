"""/v1/embeddings: the RAG embedder (rag/embeddings.py; default all-MiniLM-L6-v2) in
OpenAI's shape, beside chat.py and completion.py as vLLM's `serving_embedding` is.

The vectors are exactly the ones RAG stores for a document (`Embedder.embed`: unit length,
float32), so a client can embed with this route and search a collection's vectors, or the
other way round. What the route cannot honour is refused by name, never approximated:

- `dimensions` other than the model's own size (no shortening: MiniLM's vectors are not
  trained to be cut, as OpenAI's text-embedding-3 models are),
- an input longer than the model reads (`max_seq_length`, special tokens included):
  sentence-transformers would cut it silently, so it is a 400 `context_length_exceeded`,
- token arrays with an id outside the embedding model's vocabulary: token arrays are ids of
  the embedder's own tokenizer (as vLLM takes them), not OpenAI's tiktoken ids, which
  LangChain's OpenAIEmbeddings sends unless `check_embedding_ctx_length=False`,
- a `model` that cannot embed (the base, an adapter): a 400 that names the embedder.

No torch here: the embedder runs in a worker thread behind the retrieval service, which
loads it on first use.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from server.errors import APIError
from server.protocol import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage, ModelCard
from server.serving.base import ServingBase

logger = logging.getLogger(__name__)


class TextEmbedder(Protocol):
    """What this route needs of the embedder (server/retrieval.py's LazyEmbedder)."""

    @property
    def model_id(self) -> str: ...

    @property
    def dim(self) -> int: ...

    @property
    def max_seq_length(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def special_tokens(self) -> int: ...

    def input_length(self, text: str) -> int: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...

    def embed_token_ids(self, inputs: Sequence[Sequence[int]]) -> np.ndarray: ...


def embedding_inputs(value: Any) -> list[str] | list[list[int]]:
    """The request's `input` (already checked by EmbeddingRequest: not empty, at most 2048
    items, none empty) as a list of texts or a list of token arrays."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(v, int) for v in value):
        return [list(value)]  # one token array
    return list(value)


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        # what OpenAI sends: the float32 values' little-endian bytes, base64 encoded
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


class ServingEmbedding(ServingBase):
    endpoint = "embeddings"

    @property
    def embedder(self) -> TextEmbedder | None:
        retrieval = self.ctx.retrieval
        return None if retrieval is None else retrieval.embedder  # type: ignore[return-value]

    @property
    def model_id(self) -> str | None:
        """The `model` id that embeds (None: this server has no embedder)."""
        embedder = self.embedder
        return None if embedder is None else embedder.model_id

    def model_cards(self, created: int) -> list[ModelCard]:
        """/v1/models' entry for the embedder; listing it does not load it."""
        embedder = self.embedder
        if embedder is None:
            return []
        return [ModelCard(id=embedder.model_id, created=created, task="embed")]

    def _check_model(self, model: str) -> TextEmbedder:
        embedder = self.embedder
        if embedder is not None and model == embedder.model_id:
            return embedder
        self.resolve_model(model)  # an unknown model: the usual 404, before anything else
        hint = (
            f"use {embedder.model_id!r} (listed in /v1/models with task 'embed')"
            if embedder is not None
            else "this server has no embedding model"
        )
        raise APIError(
            400,
            f"model {model!r} generates text and cannot embed; {hint}",
            param="model",
            code="model_cannot_embed",
        )

    async def create(self, body: EmbeddingRequest) -> EmbeddingList:
        """Validate, embed in a worker thread (which loads the embedder on first use), and
        answer in OpenAI's shape."""
        started = time.monotonic()
        embedder = self._check_model(body.model)
        if body.unknown_fields:
            logger.info("ignoring unknown request fields: %s", ", ".join(body.unknown_fields))
        if body.user is not None:
            logger.info("embeddings for user %r", body.user)
        inputs = embedding_inputs(body.input)
        outcome = "error"
        try:
            vectors, tokens = await asyncio.to_thread(self._embed, embedder, inputs, body)
            outcome = "ok"
        finally:
            self.metrics.requests.labels(body.model, self.endpoint, outcome).inc()
            self.metrics.latency.labels(body.model).observe(time.monotonic() - started)
        self.metrics.prompt_tokens.labels(body.model).inc(tokens)
        data = [
            Embedding(index=i, embedding=encode_vector(v, body.encoding_format))
            for i, v in enumerate(vectors)
        ]
        usage = EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
        return EmbeddingList(data=data, model=body.model, usage=usage)

    def _embed(
        self, embedder: TextEmbedder, inputs: list[str] | list[list[int]], body: EmbeddingRequest
    ) -> tuple[np.ndarray, int]:
        """Checks that need the loaded model, then the vectors and the tokens read."""
        dim = embedder.dim  # loads the model on first use (a 503 if it cannot be loaded)
        if body.dimensions is not None and body.dimensions != dim:
            raise APIError(
                400,
                f"dimensions {body.dimensions} is not supported: {embedder.model_id} returns "
                f"{dim}-dimensional vectors and they are not shortened; send {dim} or leave "
                "dimensions out",
                param="dimensions",
            )
        limit = embedder.max_seq_length
        if isinstance(inputs[0], str):
            texts: list[str] = inputs  # type: ignore[assignment]
            lengths = [embedder.input_length(t) for t in texts]
        else:
            arrays: list[list[int]] = inputs  # type: ignore[assignment]
            vocab = embedder.vocab_size
            for i, ids in enumerate(arrays):
                bad = next((t for t in ids if not 0 <= t < vocab), None)
                if bad is not None:
                    raise APIError(
                        400,
                        f"input[{i}] holds token id {bad}, outside {embedder.model_id}'s "
                        f"vocabulary of {vocab}: token arrays are ids of the embedding "
                        "model's own tokenizer, not OpenAI's tiktoken ids (send text; with "
                        "LangChain's OpenAIEmbeddings, check_embedding_ctx_length=False)",
                        param="input",
                    )
            # the model's special tokens are added around each array, as around a text
            lengths = [len(ids) + embedder.special_tokens for ids in arrays]
        for i, n in enumerate(lengths):
            if n > limit:
                raise APIError(
                    400,
                    f"input[{i}] is {n} tokens long; {embedder.model_id} reads at most {limit} "
                    "(special tokens included). Split it, and embed the parts.",
                    param="input",
                    code="context_length_exceeded",
                )
        if isinstance(inputs[0], str):
            vectors = embedder.embed(texts)
        else:
            vectors = embedder.embed_token_ids(arrays)
        return vectors, sum(lengths)
