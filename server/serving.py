"""OpenAI chat and completions on top of an Engine: validation, prompts, responses, SSE.

No torch here: prompts become token ids through the engine, and outputs come back as
plain `GenerationOutput`s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel

from server import request_fields
from server.adapter_validation import AdapterError
from server.engine.base import Engine, EngineError, GenerationOutput, GenerationRequest
from server.engine.base import SamplingParams as EngineSampling
from server.errors import APIError, error_body, from_engine_error
from server.metrics import ServerMetrics
from server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Citation,
    Completion,
    CompletionChoice,
    CompletionRequest,
    DeltaMessage,
    ResponseMessage,
    SamplingFields,
    Usage,
    new_id,
    now,
)

logger = logging.getLogger(__name__)

ModelResolver = Callable[[str], str | None]  # model id -> adapter name (None = base)
# adapter name (None = base) -> pins it for one request, yields the engine's name for it
AdapterLease = Callable[[str | None], AbstractAsyncContextManager[str | None]]


@contextlib.asynccontextmanager
async def _no_adapters(name: str | None) -> AsyncIterator[str | None]:
    yield name


@dataclass
class Prepared:
    """A validated request, ready for the engine."""

    model: str
    adapter: str | None
    prompts: list[list[int]]
    sampling: EngineSampling
    started: float = field(default_factory=time.monotonic)
    # passages retrieved for a `rag` request (None: no retrieval asked for)
    citations: list[Citation] | None = None
    # Online A/B (server/ab/splits.py) sets these: the id the response will carry (known
    # before generation, so feedback can name it), the arm that served it, and a callback
    # with choice 0's finished text (the answer a preference pair is made of).
    response_id: str | None = None
    ab_arm: str | None = None
    on_complete: Callable[[str], None] | None = None


class AbortFlag(Protocol):
    """What serving needs of the shutdown's abort flag (server/drain.py's Flag)."""

    def is_set(self) -> bool: ...

    async def wait(self) -> None: ...


class GenerationAborted(Exception):
    """The server cut this generation short (end of the shutdown grace period)."""


# finish_reason of a choice cut short by the server's shutdown (vLLM uses the same word)
ABORT = "abort"


class OpenAIServing:
    def __init__(
        self,
        engine: Engine,
        *,
        resolve_model: ModelResolver,
        metrics: ServerMetrics,
        max_model_len: int,
        default_max_tokens: int,
        max_n: int,
        request_timeout_s: float,
        lease: AdapterLease = _no_adapters,
        abort: AbortFlag | None = None,
        context_tokens: Callable[[str | None], int] = lambda adapter: 0,
    ):
        self.engine = engine
        # set at the end of the shutdown grace (server/drain.py): running generations end
        # with finish_reason "abort"
        self.abort = abort
        self.lease = lease
        # positions of the context an adapter takes before every prompt (virtual tokens)
        self.context_tokens = context_tokens
        self.resolve_model = resolve_model
        self.metrics = metrics
        self.max_model_len = max_model_len
        self.default_max_tokens = default_max_tokens
        self.max_n = max_n
        self.request_timeout_s = request_timeout_s

    # --- validation -------------------------------------------------------------------------

    def _check_common(self, req: SamplingFields) -> str | None:
        if req.unknown_fields:
            logger.info("ignoring unknown request fields: %s", ", ".join(req.unknown_fields))
        rules = (
            request_fields.CHAT
            if isinstance(req, ChatCompletionRequest)
            else (request_fields.COMPLETIONS)
        )
        refused = request_fields.refused_field(
            req.model_dump(include={r.name for r in rules}), rules
        )
        if refused is not None:
            raise APIError(400, refused.reason, param=refused.name, code="unsupported_field")
        if req.n > self.max_n:
            raise APIError(400, f"n must be at most {self.max_n}", param="n")
        if req.stream_options is not None and not req.stream:
            raise APIError(
                400, "stream_options is only allowed when stream is true", param="stream_options"
            )
        return self.resolve_model(req.model)

    def _sampling(
        self, req: SamplingFields, prompt_tokens: int, param: str, adapter: str | None = None
    ) -> EngineSampling:
        reserved = self.context_tokens(adapter) if adapter else 0
        room = self.max_model_len - prompt_tokens - reserved
        # the adapter's virtual tokens count as prompt: the model sees them as such
        also = f" (and the adapter adds {reserved} virtual tokens)" if reserved else ""
        if room < 1:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"your prompt has {prompt_tokens} tokens{also}. Please shorten it.",
                param=param,
                code="context_length_exceeded",
            )
        if req.max_tokens is not None:
            if req.max_tokens < 1:
                raise APIError(400, "max_tokens must be at least 1", param="max_tokens")
            if req.max_tokens > room:
                raise APIError(
                    400,
                    f"This model's maximum context length is {self.max_model_len} tokens. "
                    f"However, you requested {prompt_tokens + reserved + req.max_tokens} tokens "
                    f"({prompt_tokens} in the prompt{also}, {req.max_tokens} for the "
                    "completion). "
                    "Please reduce the prompt or max_tokens.",
                    param="max_tokens",
                    code="context_length_exceeded",
                )
            max_tokens = req.max_tokens
        else:
            max_tokens = min(self.default_max_tokens, room)
        return EngineSampling(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
            stop=req.stop_list,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            n=req.n,
            ignore_eos=req.ignore_eos,
        )

    def prepare_chat(
        self, req: ChatCompletionRequest, messages: list[dict[str, str]] | None = None
    ) -> Prepared:
        adapter = self._check_common(req)
        if not req.messages:
            raise APIError(400, "messages must not be empty", param="messages")
        if messages is None:
            messages = chat_messages(req)
        try:
            prompt = self.engine.render_chat(messages)
        except Exception as exc:  # a template that rejects the conversation
            raise APIError(400, f"cannot format these messages: {exc}", param="messages") from exc
        ids = self.engine.tokenize(prompt)
        return Prepared(
            model=req.model,
            adapter=adapter,
            prompts=[ids],
            sampling=self._sampling(req, len(ids), "messages", adapter),
        )

    def prepare_completion(
        self, req: CompletionRequest, prompt_override: str | None = None
    ) -> Prepared:
        adapter = self._check_common(req)
        prompts = completion_prompts(req.prompt)
        if prompt_override is not None:
            prompts = [prompt_override]
        token_lists: list[list[int]] = []
        vocab = self.engine.info.vocab_size
        for p in prompts:
            ids = self.engine.tokenize(p) if isinstance(p, str) else p
            if not ids:
                raise APIError(400, "prompt must not be empty", param="prompt")
            if not isinstance(p, str) and vocab is not None:
                bad = next((t for t in ids if not 0 <= t < vocab), None)
                if bad is not None:
                    # caught here: in the model it would fail the whole batch's step
                    raise APIError(
                        400,
                        f"prompt holds token id {bad}, outside this model's vocabulary "
                        f"(0 to {vocab - 1})",
                        param="prompt",
                    )
            token_lists.append(ids)
        longest = max(len(t) for t in token_lists)
        sampling = self._sampling(req, longest, "prompt", adapter)
        if len(token_lists) * req.n > self.max_n:
            raise APIError(400, f"prompts x n must be at most {self.max_n}", param="prompt")
        return Prepared(model=req.model, adapter=adapter, prompts=token_lists, sampling=sampling)

    # --- running ----------------------------------------------------------------------------

    async def _outputs(self, prep: Prepared) -> AsyncIterator[GenerationOutput]:
        """All choices of all prompts, interleaved; choice index = prompt * n + choice.

        Raises GenerationAborted when `abort` is set (the server's shutdown grace is over);
        the engine's requests are cancelled and the adapter released before it does."""
        gen = self._leased_outputs(prep)
        if self.abort is None:
            async for out in gen:
                yield out
            return
        cut = asyncio.ensure_future(self.abort.wait())
        step: asyncio.Future[GenerationOutput] | None = None
        try:
            while True:
                step = asyncio.ensure_future(anext(gen))
                await asyncio.wait({step, cut}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    raise GenerationAborted("the server's shutdown grace period is over")
                try:
                    out = step.result()
                except StopAsyncIteration:
                    return
                step = None
                yield out
        finally:
            cut.cancel()
            if step is not None and not step.done():
                step.cancel()
                await asyncio.wait({step})  # the generator must stop before aclose
            await gen.aclose()

    async def _leased_outputs(self, prep: Prepared) -> AsyncGenerator[GenerationOutput, None]:
        async with self.lease(prep.adapter) as engine_adapter:
            async for out in self._engine_outputs(prep, engine_adapter):
                yield out

    async def _engine_outputs(
        self, prep: Prepared, engine_adapter: str | None
    ) -> AsyncIterator[GenerationOutput]:
        n = prep.sampling.n
        streams = [
            self.engine.generate(
                GenerationRequest(
                    request_id=new_id("gen"),
                    prompt_token_ids=ids,
                    sampling=prep.sampling,
                    adapter=engine_adapter,
                    timeout_s=self.request_timeout_s,
                )
            )
            for ids in prep.prompts
        ]
        if len(streams) == 1:
            async for out in streams[0]:
                yield out
            return
        queue: asyncio.Queue[tuple[int, GenerationOutput | BaseException | None]] = asyncio.Queue()

        async def pump(i: int, stream: AsyncIterator[GenerationOutput]) -> None:
            try:
                async for out in stream:
                    await queue.put((i, out))
                await queue.put((i, None))
            except BaseException as exc:
                await queue.put((i, exc))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        try:
            live = len(tasks)
            while live:
                i, item = await queue.get()
                if item is None:
                    live -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                item.index = i * n + item.index
                yield item
        finally:
            for task in tasks:
                task.cancel()

    def _observe(
        self,
        prep: Prepared,
        endpoint: str,
        prompt_tokens: int,
        completion: int,
        first_token_at: float | None,
        outcome: str,
    ) -> None:
        label = prep.model
        m = self.metrics
        m.requests.labels(label, endpoint, outcome).inc()
        m.prompt_tokens.labels(label).inc(prompt_tokens)
        m.completion_tokens.labels(label).inc(completion)
        end = time.monotonic()
        m.latency.labels(label).observe(end - prep.started)
        if first_token_at is not None:
            m.ttft.labels(label).observe(first_token_at - prep.started)
            if completion > 1 and end > first_token_at:
                m.tokens_per_second.labels(label).observe((completion - 1) / (end - first_token_at))

    async def collect(
        self, prep: Prepared, endpoint: str
    ) -> tuple[dict[int, str], dict[int, str], Usage]:
        """Run to completion: text and finish reason per choice, and usage."""
        texts: dict[int, list[str]] = {}
        finish: dict[int, str] = {}
        tokens: dict[int, int] = {}  # completion tokens so far, per choice
        first: float | None = None
        try:
            async for out in self._outputs(prep):
                if first is None:
                    first = time.monotonic()
                texts.setdefault(out.index, []).append(out.text)
                tokens[out.index] = out.completion_tokens
                if out.finish_reason is not None:
                    finish[out.index] = out.finish_reason
        except EngineError as exc:
            self._observe(prep, endpoint, 0, sum(tokens.values()), first, "error")
            raise from_engine_error(exc) from exc
        except GenerationAborted:
            # the text so far, marked as cut: the caller gets an answer, not an error
            for i in range(len(prep.prompts) * prep.sampling.n):
                finish.setdefault(i, ABORT)
            outcome = "aborted"
        else:
            outcome = "ok"
        completion = sum(tokens.values())
        prompt_tokens = sum(len(p) for p in prep.prompts)
        self._observe(prep, endpoint, prompt_tokens, completion, first, outcome)
        usage = Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion,
            total_tokens=prompt_tokens + completion,
        )
        return {i: "".join(t) for i, t in texts.items()}, finish, usage

    async def chat(self, prep: Prepared) -> ChatCompletion:
        texts, finish, usage = await self.collect(prep, "chat")
        if prep.on_complete is not None and ABORT not in finish.values():
            prep.on_complete(texts.get(0, ""))
        choices = [
            ChatChoice(
                index=i,
                message=ResponseMessage(content=texts.get(i, "")),
                finish_reason=finish.get(i, "length"),  # type: ignore[arg-type]
            )
            for i in range(len(prep.prompts) * prep.sampling.n)
        ]
        return ChatCompletion(
            id=prep.response_id or new_id("chatcmpl"),
            created=now(),
            model=prep.model,
            choices=choices,
            usage=usage,
            citations=prep.citations,
            ab_arm=prep.ab_arm,
        )

    async def completion(self, prep: Prepared) -> Completion:
        texts, finish, usage = await self.collect(prep, "completions")
        if prep.on_complete is not None:
            prep.on_complete(texts.get(0, ""))
        choices = [
            CompletionChoice(index=i, text=texts.get(i, ""), finish_reason=finish.get(i, "length"))  # type: ignore[arg-type]
            for i in range(len(prep.prompts) * prep.sampling.n)
        ]
        return Completion(
            id=prep.response_id or new_id("cmpl"),
            created=now(),
            model=prep.model,
            choices=choices,
            usage=usage,
            citations=prep.citations,
            ab_arm=prep.ab_arm,
        )

    async def stream(
        self, prep: Prepared, *, chat: bool, include_usage: bool
    ) -> AsyncIterator[str]:
        """Server-sent events, OpenAI style, ending with `data: [DONE]`."""
        rid = prep.response_id or new_id("chatcmpl" if chat else "cmpl")
        created = now()
        endpoint = "chat" if chat else "completions"
        first: float | None = None
        n_choices = len(prep.prompts) * prep.sampling.n
        outcome = "cancelled"
        answer: list[str] = []  # choice 0's text, kept only for prep.on_complete
        finished: set[int] = set()
        tokens: dict[int, int] = {}  # completion tokens so far, per choice

        def chunk(
            index: int,
            text: str | None,
            finish: str | None,
            role: bool = False,
            citations: list[Citation] | None = None,
        ) -> str:
            body: BaseModel
            if chat:
                delta = DeltaMessage(role="assistant" if role else None, content=text)
                body = ChatCompletionChunk(
                    id=rid,
                    created=created,
                    model=prep.model,
                    choices=[ChatChunkChoice(index=index, delta=delta, finish_reason=finish)],  # type: ignore[arg-type]
                )
            else:
                body = Completion(
                    id=rid,
                    created=created,
                    model=prep.model,
                    choices=[CompletionChoice(index=index, text=text or "", finish_reason=finish)],  # type: ignore[arg-type]
                )
            data = body.model_dump(exclude_none=False, exclude={"citations", "ab_arm"})
            if citations is not None:
                data["citations"] = [c.model_dump() for c in citations]
            if prep.ab_arm is not None:  # only A/B traffic carries the extension field
                data["ab_arm"] = prep.ab_arm
            return _sse(data)

        try:
            # Citations ride on the FIRST chunk, a normal chunk of the normal object type,
            # so clients that know nothing of them parse the stream unchanged (a separate
            # event type breaks SDKs that parse every event as a chunk). Chat: the role
            # chunk of choice 0; completions: an empty text chunk sent before any token.
            if chat:
                for i in range(n_choices):
                    first_citations = prep.citations if i == 0 else None
                    yield chunk(i, "", None, role=True, citations=first_citations)
            elif prep.citations is not None:
                yield chunk(0, "", None, citations=prep.citations)
            aborted = False
            try:
                async for out in self._outputs(prep):
                    if first is None:
                        first = time.monotonic()
                    tokens[out.index] = out.completion_tokens
                    if out.text:
                        if prep.on_complete is not None and out.index == 0:
                            answer.append(out.text)
                        yield chunk(out.index, out.text, None)
                    if out.finish_reason is not None:
                        finished.add(out.index)
                        yield chunk(out.index, None if chat else "", out.finish_reason)
            except GenerationAborted:
                # Cut by the server's shutdown: each unfinished choice gets a final chunk
                # that says so, then usage and [DONE] as usual: the stream ends, not torn.
                aborted = True
                for i in range(n_choices):
                    if i not in finished:
                        yield chunk(i, None if chat else "", ABORT)
            completion = sum(tokens.values())
            prompt_tokens = sum(len(p) for p in prep.prompts)
            if include_usage:
                usage = Usage(
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion,
                    total_tokens=prompt_tokens + completion,
                )
                obj = "chat.completion.chunk" if chat else "text_completion"
                yield _sse(
                    {
                        "id": rid,
                        "object": obj,
                        "created": created,
                        "model": prep.model,
                        "choices": [],
                        "usage": usage.model_dump(),
                    }
                )
            outcome = "aborted" if aborted else "ok"
            if prep.on_complete is not None and not aborted:
                prep.on_complete("".join(answer))
            yield "data: [DONE]\n\n"
        except EngineError as exc:
            outcome = "error"
            err = from_engine_error(exc)
            yield _sse(error_body(err.status, err.message, err.param, err.code))
            yield "data: [DONE]\n\n"
        except AdapterError as exc:  # e.g. unregistered while this request waited
            outcome = "error"
            yield _sse(error_body(exc.status, exc.message, exc.param, exc.code))
            yield "data: [DONE]\n\n"
        except Exception:
            # a bug, not the caller's fault: still an ending the client can parse (the
            # response has started, so a 500 status can no longer be sent)
            outcome = "error"
            logger.exception("streamed generation failed")
            yield _sse(error_body(500, "internal server error", None, "internal_error"))
            yield "data: [DONE]\n\n"
        finally:
            self._observe(
                prep,
                endpoint,
                sum(len(p) for p in prep.prompts),
                sum(tokens.values()),
                first,
                outcome,
            )


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for i, message in enumerate(req.messages):
        try:
            text = message.text()
        except ValueError as exc:
            raise APIError(400, str(exc), param=f"messages.{i}.content") from exc
        if (message.model_extra or {}).get("tool_calls"):
            raise APIError(
                400,
                "assistant messages with tool_calls are not supported by this server yet",
                param=f"messages.{i}.tool_calls",
                code="unsupported_field",
            )
        role = {"developer": "system", "tool": "user"}.get(message.role, message.role)
        out.append({"role": role, "content": text})
    return out


def completion_prompts(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)
