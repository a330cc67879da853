"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models.

Both generation routes take swapserve's `rag` extension ({collection, top_k, min_score,
filter}): the passages retrieved are put into the prompt, and the response carries them
as `citations` (non-streamed: a top-level field; streamed: on the first SSE chunk).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.auth import require_collection
from server.errors import APIError
from server.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Citation,
    Completion,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    RAGOptions,
)
from server.serving import OpenAIServing, Prepared, chat_messages
from server.state import EngineDep, RetrievalDep, ServingDep, SettingsDep

AB_PREFIX = "ab:"

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


@contextlib.contextmanager
def _passages_hint(opts: RAGOptions | None, citations: list[Citation] | None) -> Iterator[None]:
    """A prompt over the context window because of retrieved passages: say so, or the
    caller is told to shorten a prompt that they did not write."""
    try:
        yield
    except APIError as exc:
        if opts is None or not citations or exc.code != "context_length_exceeded":
            raise
        exc.message += (
            f" The prompt includes {len(citations)} retrieved passages: lower rag.top_k "
            "or max_tokens."
        )
        raise


def _allowed(opts: RAGOptions) -> None:
    try:
        require_collection(opts.collection)
    except APIError as exc:
        exc.param = "rag.collection"
        raise


async def prepare_chat_request(
    state: Any, body: ChatCompletionRequest, serving: OpenAIServing
) -> Prepared:
    """Request -> Prepared, exactly as the chat route does it.

    The A/B experiment runner calls this too, so an arm with `rag` settings goes through
    the same routing, retrieval and validation as a client's request does.
    """
    splits = getattr(state, "ab_splits", None)
    routed = None
    if splits is not None and body.model.startswith(AB_PREFIX):
        routed = splits.route(body)  # `ab:<split>` -> one arm's model (and its `rag`)
        body = routed.request
    messages = None
    citations = None
    if body.rag is not None:
        # Retrieval before the prompt is built: `model` picks the behaviour (base or an
        # adapter), `rag` the knowledge. The model is checked first, so an unknown model
        # costs no embedding.
        serving.resolve_model(body.model)
        _allowed(body.rag)
        messages, citations = await state.rag.augment_chat(body.rag, chat_messages(body))
    with _passages_hint(body.rag, citations):
        prep = serving.prepare_chat(body, messages)
    prep.citations = citations
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
async def completions(
    body: CompletionRequest, request: Request, serving: ServingDep, rag: RetrievalDep
):
    splits = getattr(request.app.state, "ab_splits", None)
    routed = None
    if splits is not None and body.model.startswith(AB_PREFIX):
        routed = splits.route(body)  # `ab:<split>` -> one arm's model (and its `rag`)
        body = routed.request
    prompt = None
    citations = None
    if body.rag is not None:
        if not isinstance(body.prompt, str):
            raise APIError(
                400,
                "with `rag`, prompt must be a single string (it is the retrieval query)",
                param="prompt",
            )
        serving.resolve_model(body.model)
        _allowed(body.rag)
        prompt, citations = await rag.augment_prompt(body.rag, body.prompt)
    with _passages_hint(body.rag, citations):
        prep = serving.prepare_completion(body, prompt)
    prep.citations = citations
    if routed is not None:
        routed.attach(prep)
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
