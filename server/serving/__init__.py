"""The serving layer: OpenAI requests -> engine requests -> OpenAI responses.

One module per endpoint family over one shared base, as vLLM's `serving_chat` /
`serving_completion` are:

    base.py        ServingContext (engine, limits, retrieval, A/B splits) and ServingBase
                   (validation, the engine run, usage, metrics, the SSE skeleton)
    chat.py        ServingChat: messages -> chat template -> chat.completion(.chunk)
    completion.py  ServingCompletion: prompts -> text_completion
    embeddings.py  ServingEmbedding: inputs -> the RAG embedder's vectors, OpenAI's shape

Routes (server/routes/openai.py) and the A/B experiment runner (server/ab/experiments.py)
call `prepare`, then `create` or `stream`, on the one `OpenAIServing` the app holds.
"""

from __future__ import annotations

from server.serving.base import (
    AB_PREFIX,
    ABORT,
    AbortFlag,
    AdapterLease,
    GenerationAborted,
    ModelResolver,
    Prepared,
    ServingBase,
    ServingContext,
    SplitRouter,
)
from server.serving.chat import ServingChat, chat_messages
from server.serving.completion import ServingCompletion, completion_prompts
from server.serving.embeddings import ServingEmbedding


class OpenAIServing:
    """The serving classes the app holds, over one shared context."""

    def __init__(self, ctx: ServingContext):
        self.ctx = ctx
        self.chat = ServingChat(ctx)
        self.completion = ServingCompletion(ctx)
        self.embedding = ServingEmbedding(ctx)

    def resolve_model(self, model: str) -> str | None:
        """The adapter a model id names (None = the base); 404 for an unknown model."""
        return self.ctx.resolve_model(model)


__all__ = [
    "ABORT",
    "AB_PREFIX",
    "AbortFlag",
    "AdapterLease",
    "GenerationAborted",
    "ModelResolver",
    "OpenAIServing",
    "Prepared",
    "ServingBase",
    "ServingChat",
    "ServingCompletion",
    "ServingEmbedding",
    "ServingContext",
    "SplitRouter",
    "chat_messages",
    "completion_prompts",
]
