"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

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
    ErrorResponse,
    ModelCard,
    ModelList,
)
from server.serving import OpenAIServing, Prepared
from server.state import EngineDep, ServingDep, SettingsDep

AB_PREFIX = "ab:"

router = APIRouter(prefix="/v1", tags=["openai"])

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 413, 429, 503, 504)
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


async def prepare_chat_request(
    state: Any, body: ChatCompletionRequest, serving: OpenAIServing
) -> Prepared:
    """Request -> Prepared, exactly as the chat route does it.

    The A/B experiment runner calls this too, so an arm with `rag` settings goes through
    the same retrieval and validation as a client's request does.
    """
    splits = getattr(state, "ab_splits", None)
    routed = None
    if splits is not None and body.model.startswith(AB_PREFIX):
        routed = splits.route(body)  # `ab:<split>` -> one arm's model (and its `rag`)
        body = routed.request
    hooks = getattr(state, "chat_hooks", [])
    messages = None
    extra: dict[str, Any] = {}
    for hook in hooks:  # e.g. retrieval: rewrites messages, adds citations
        messages = await hook(body, extra)
    prep = serving.prepare_chat(body, messages)
    prep.extra.update(extra)
    if routed is not None:
        routed.attach(prep)
    return prep


@router.post("/chat/completions", response_model=ChatCompletion, responses=ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request, serving: ServingDep):
    prep = await prepare_chat_request(request.app.state, body, serving)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _sse_response(serving.stream(prep, chat=True, include_usage=include_usage))
    return await _unless_disconnected(request, serving.chat(prep))


@router.post("/completions", response_model=Completion, responses=ERRORS)
async def completions(body: CompletionRequest, request: Request, serving: ServingDep):
    prep = serving.prepare_completion(body)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _sse_response(serving.stream(prep, chat=False, include_usage=include_usage))
    return await _unless_disconnected(request, serving.completion(prep))


@router.get("/models", response_model=ModelList)
async def list_models(request: Request, engine: EngineDep, settings: SettingsDep) -> ModelList:
    cards = [
        ModelCard(
            id=settings.served_model_name,
            created=request.app.state.started_at,
            root=engine.info.model_id,
            max_model_len=engine.info.max_model_len,
        )
    ]
    for card in getattr(request.app.state, "extra_models", lambda: [])():
        cards.append(card)
    return ModelList(data=cards)
