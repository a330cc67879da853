"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/embeddings,
/v1/models.

Thin: request preparation (A/B split routing, the `rag` extension's retrieval, validation,
prompts) and the response shapes live in the serving layer (server/serving/). Both
generation routes take swapserve's `rag` extension ({collection, top_k, min_score,
filter}): the passages retrieved are put into the prompt, and the response carries them
as `citations` (non-streamed: a top-level field; streamed: on the first SSE chunk).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.errors import APIError
from server.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    EmbeddingList,
    EmbeddingRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from server.state import EngineDep, ServingDep, SettingsDep

router = APIRouter(prefix="/v1", tags=["openai"])

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 409, 413, 422, 429, 503, 504)
}

T = TypeVar("T")


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Cancel the generation if the client hangs up before the answer is ready."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise APIError(499, "client closed the request", code="client_closed")


def _sse_response(body: Any) -> StreamingResponse:
    return StreamingResponse(
        body,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post("/chat/completions", response_model=ChatCompletion, responses=ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request, serving: ServingDep):
    chat = serving.chat
    prep = await chat.prepare(body)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _sse_response(chat.stream(prep, include_usage=include_usage))
    return await _unless_disconnected(request, chat.create(prep))


@router.post("/completions", response_model=Completion, responses=ERRORS)
async def completions(body: CompletionRequest, request: Request, serving: ServingDep):
    completion = serving.completion
    prep = await completion.prepare(body)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _sse_response(completion.stream(prep, include_usage=include_usage))
    return await _unless_disconnected(request, completion.create(prep))


@router.post("/embeddings", response_model=EmbeddingList, responses=ERRORS)
async def embeddings(body: EmbeddingRequest, request: Request, serving: ServingDep):
    return await _unless_disconnected(request, serving.embedding.create(body))


@router.get("/models", response_model=ModelList)
async def list_models(
    request: Request, engine: EngineDep, settings: SettingsDep, serving: ServingDep
) -> ModelList:
    created = request.app.state.started_at
    cards = [
        ModelCard(
            id=settings.served_model_name,
            created=created,
            root=engine.info.model_id,
            max_model_len=engine.info.max_model_len,
        ),
        *serving.embedding.model_cards(created),
    ]
    for card in getattr(request.app.state, "extra_models", lambda: [])():
        cards.append(card)
    return ModelList(data=cards)
