"""The serving layer's shared base: what chat and completions (and, next, embeddings) have
in common on top of an Engine.

vLLM keeps `serving_chat`, `serving_completion` and `serving_embedding` side by side over
one base class; so does this package. Request preparation (A/B split routing, retrieval,
validation, the prompt's token ids) lives here and in its siblings, not in the routes: a
route parses the body, calls `prepare`, then `create` or `stream`, and the A/B experiment
runner calls the very same methods.

No torch here: prompts become token ids through the engine, and outputs come back as
plain `GenerationOutput`s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from server import request_fields
from server.adapter_validation import AdapterError
from server.auth import require_collection
from server.engine import structured
from server.engine.base import (
    Engine,
    EngineError,
    GenerationOutput,
    GenerationRequest,
    StructuredOutput,
    TokenLogprobs,
)
from server.engine.base import SamplingParams as EngineSampling
from server.errors import APIError, error_body, from_engine_error
from server.metrics import ServerMetrics
from server.protocol import (
    ChatCompletionRequest,
    Citation,
    CompletionRequest,
    RAGOptions,
    SamplingFields,
    Usage,
    new_id,
    now,
)

if TYPE_CHECKING:
    from server.retrieval import RetrievalService

logger = logging.getLogger(__name__)

ModelResolver = Callable[[str], str | None]  # model id -> adapter name (None = base)
# adapter name (None = base) -> pins it for one request, yields the engine's name for it
AdapterLease = Callable[[str | None], AbstractAsyncContextManager[str | None]]

# `model: "ab:<split>"` names an online A/B split, not a model (server/ab/splits.py)
AB_PREFIX = "ab:"


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
    # completions' echo: each prompt's text, put before its choices' text
    echo: list[str] | None = None
    # chat with tools: how the answer becomes tool_calls (server/serving/tools.py)
    tools: Any = None

    @property
    def n_choices(self) -> int:
        return len(self.prompts) * self.sampling.n


@dataclass
class ChoiceState:
    """One choice as its outputs arrive: text, finish, tokens, log probabilities."""

    parts: list[str] = field(default_factory=list)
    finish: str | None = None
    tokens: int = 0  # completion tokens so far
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] | None = None
    echo_len: int = 0  # streamed completions: characters of echoed prompt sent first

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def add(self, out: GenerationOutput) -> None:
        self.parts.append(out.text)
        self.tokens = out.completion_tokens
        if out.logprobs:
            self.logprobs.extend(out.logprobs)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.finish_reason is not None:
            self.finish = out.finish_reason


class Routed(Protocol):
    """A request rewritten to one A/B arm (server/ab/splits.py's Routed)."""

    request: Any

    def attach(self, prep: Prepared) -> None: ...


class SplitRouter(Protocol):
    """What serving needs of the online A/B splits: `ab:<split>` -> one arm's request."""

    def route(self, body: Any) -> Routed: ...


class AbortFlag(Protocol):
    """What serving needs of the shutdown's abort flag (server/drain.py's Flag)."""

    def is_set(self) -> bool: ...

    async def wait(self) -> None: ...


class GenerationAborted(Exception):
    """The server cut this generation short (end of the shutdown grace period)."""


# finish_reason of a choice cut short by the server's shutdown (vLLM uses the same word)
ABORT = "abort"


@dataclass
class ServingContext:
    """What every serving class shares: the engine, the model and adapter lookups, limits,
    and the request-time services (retrieval, A/B splits) a request may call on."""

    engine: Engine
    resolve_model: ModelResolver
    metrics: ServerMetrics
    max_model_len: int
    default_max_tokens: int
    max_n: int
    request_timeout_s: float
    lease: AdapterLease = _no_adapters
    # set at the end of the shutdown grace (server/drain.py): running generations end
    # with finish_reason "abort"
    abort: AbortFlag | None = None
    retrieval: RetrievalService | None = None
    splits: SplitRouter | None = None
    # positions of the context an adapter takes before every prompt (virtual tokens)
    context_tokens: Callable[[str | None], int] = lambda adapter: 0


class ServingBase:
    """Validation, the engine run, usage and metrics, and the SSE skeleton; the endpoint
    classes (chat.py, completion.py) add their preparation and response shapes."""

    endpoint = ""  # the metrics' endpoint label
    id_prefix = ""  # response ids: <prefix>-<hex>
    chunk_object = ""  # `object` of a streamed chunk

    def __init__(self, ctx: ServingContext):
        self.ctx = ctx
        self.engine = ctx.engine
        self.metrics = ctx.metrics

    def resolve_model(self, model: str) -> str | None:
        return self.ctx.resolve_model(model)

    # --- preparation shared by the endpoints ---------------------------------------------

    def _route_split(self, body: Any) -> tuple[Any, Routed | None]:
        """`ab:<split>` -> one arm's model (and its `rag`), before anything else looks at it."""
        splits = self.ctx.splits
        if splits is None or not body.model.startswith(AB_PREFIX):
            return body, None
        routed = splits.route(body)
        return routed.request, routed

    def _retrieval(self, body: ChatCompletionRequest | CompletionRequest) -> RetrievalService:
        """Checks made before any retrieval: the model first, so an unknown model costs no
        embedding; then the key's allow-list for the collection."""
        assert body.rag is not None
        self.resolve_model(body.model)
        try:
            require_collection(body.rag.collection)
        except APIError as exc:
            exc.param = "rag.collection"
            raise
        if self.ctx.retrieval is None:
            raise APIError(400, "retrieval is not enabled on this server", param="rag")
        return self.ctx.retrieval

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
        if req.n > self.ctx.max_n:
            raise APIError(400, f"n must be at most {self.ctx.max_n}", param="n")
        if req.stream_options is not None and not req.stream:
            raise APIError(
                400, "stream_options is only allowed when stream is true", param="stream_options"
            )
        return self.resolve_model(req.model)

    def _sampling(
        self, req: SamplingFields, prompt_tokens: int, param: str, adapter: str | None = None
    ) -> EngineSampling:
        max_model_len = self.ctx.max_model_len
        reserved = self.ctx.context_tokens(adapter) if adapter else 0
        room = max_model_len - prompt_tokens - reserved
        # the adapter's virtual tokens count as prompt: the model sees them as such
        also = f" (and the adapter adds {reserved} virtual tokens)" if reserved else ""
        if room < 1:
            raise APIError(
                400,
                f"This model's maximum context length is {max_model_len} tokens. However, "
                f"your prompt has {prompt_tokens} tokens{also}. Please shorten it.",
                param=param,
                code="context_length_exceeded",
            )
        if req.max_tokens is not None:
            least = 0 if getattr(req, "echo", False) else 1
            if req.max_tokens < least:
                raise APIError(
                    400,
                    "max_tokens must be at least 1 (0 only with echo: the prompt's logprobs)",
                    param="max_tokens",
                )
            if req.max_tokens > room:
                raise APIError(
                    400,
                    f"This model's maximum context length is {max_model_len} tokens. "
                    f"However, you requested {prompt_tokens + reserved + req.max_tokens} tokens "
                    f"({prompt_tokens} in the prompt{also}, {req.max_tokens} for the "
                    "completion). "
                    "Please reduce the prompt or max_tokens.",
                    param="max_tokens",
                    code="context_length_exceeded",
                )
            max_tokens = req.max_tokens
        else:
            max_tokens = min(self.ctx.default_max_tokens, room)
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
            logit_bias=self._logit_bias(req),
        )

    def _logit_bias(self, req: SamplingFields) -> dict[int, float]:
        """OpenAI's logit_bias: {"token id": bias in [-100, 100]}."""
        if not req.logit_bias:
            return {}
        vocab = self.engine.info.vocab_size
        out: dict[int, float] = {}
        for key, bias in req.logit_bias.items():
            try:
                token = int(key)
            except ValueError:
                token = -1
            if token < 0 or (vocab is not None and token >= vocab):
                top = f" (0 to {vocab - 1})" if vocab is not None else ""
                raise APIError(
                    400,
                    f"logit_bias keys must be token ids of this model{top}; got {key!r}",
                    param="logit_bias",
                )
            if not -100 <= bias <= 100:
                raise APIError(
                    400, "logit_bias values must be between -100 and 100", param="logit_bias"
                )
            out[token] = float(bias)
        return out

    def _response_format(
        self, value: dict[str, Any] | None, param: str = "response_format"
    ) -> StructuredOutput | None:
        """OpenAI's response_format -> what the output must match (None: free text)."""
        if value is None:
            return None
        kind = value.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            spec = StructuredOutput(json_object=True)
        elif kind == "json_schema":
            body = value.get("json_schema")
            schema = body.get("schema") if isinstance(body, dict) else None
            if not isinstance(schema, dict):
                raise APIError(
                    400,
                    "response_format json_schema needs json_schema.schema, a JSON schema object",
                    param=f"{param}.json_schema",
                )
            spec = StructuredOutput(json_schema=schema)
        else:
            raise APIError(
                400,
                f"response_format type must be 'text', 'json_object' or 'json_schema', "
                f"not {kind!r}",
                param=f"{param}.type",
            )
        self._check_structured(spec, param)
        return spec

    def _check_structured(self, spec: StructuredOutput, param: str) -> None:
        error = structured.check(spec)
        if error is not None:
            raise APIError(
                400,
                f"the grammar library cannot compile this schema: {error}",
                param=param,
                code="invalid_schema",
            )

    # --- running ----------------------------------------------------------------------------

    async def _outputs(self, prep: Prepared) -> AsyncIterator[GenerationOutput]:
        """All choices of all prompts, interleaved; choice index = prompt * n + choice.

        Raises GenerationAborted when `abort` is set (the server's shutdown grace is over);
        the engine's requests are cancelled and the adapter released before it does."""
        gen = self._leased_outputs(prep)
        abort = self.ctx.abort
        if abort is None:
            async for out in gen:
                yield out
            return
        cut = asyncio.ensure_future(abort.wait())
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
        async with self.ctx.lease(prep.adapter) as engine_adapter:
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
                    timeout_s=self.ctx.request_timeout_s,
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
        prompt_tokens: int,
        completion: int,
        first_token_at: float | None,
        outcome: str,
    ) -> None:
        label = prep.model
        m = self.metrics
        m.requests.labels(label, self.endpoint, outcome).inc()
        m.prompt_tokens.labels(label).inc(prompt_tokens)
        m.completion_tokens.labels(label).inc(completion)
        end = time.monotonic()
        m.latency.labels(label).observe(end - prep.started)
        if first_token_at is not None:
            m.ttft.labels(label).observe(first_token_at - prep.started)
            if completion > 1 and end > first_token_at:
                m.tokens_per_second.labels(label).observe((completion - 1) / (end - first_token_at))

    def _usage(self, prep: Prepared, completion: int) -> Usage:
        prompt_tokens = sum(len(p) for p in prep.prompts)
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion,
            total_tokens=prompt_tokens + completion,
        )

    async def collect(self, prep: Prepared) -> tuple[dict[int, ChoiceState], Usage]:
        """Run to completion: each choice's state, and usage."""
        choices = {i: ChoiceState() for i in range(prep.n_choices)}
        first: float | None = None
        try:
            async for out in self._outputs(prep):
                if first is None:
                    first = time.monotonic()
                choices[out.index].add(out)
        except EngineError as exc:
            tokens = sum(c.tokens for c in choices.values())
            self._observe(prep, 0, tokens, first, "error")
            raise from_engine_error(exc) from exc
        except GenerationAborted:
            # the text so far, marked as cut: the caller gets an answer, not an error
            for c in choices.values():
                if c.finish is None:
                    c.finish = ABORT
            outcome = "aborted"
        else:
            outcome = "ok"
        usage = self._usage(prep, sum(c.tokens for c in choices.values()))
        self._observe(prep, usage.prompt_tokens, usage.completion_tokens, first, outcome)
        return choices, usage

    # --- streaming ----------------------------------------------------------------------------

    def _opening_chunks(self, prep: Prepared, rid: str, created: int) -> Iterator[dict[str, Any]]:
        """Chunks sent before any token (chat: the role of each choice)."""
        return iter(())

    def _delta_chunks(
        self, prep: Prepared, rid: str, created: int, out: GenerationOutput, state: ChoiceState
    ) -> Iterator[dict[str, Any]]:
        """Chunks for one output's text and log probabilities (its finish comes after)."""
        raise NotImplementedError

    def _end_chunks(
        self, prep: Prepared, rid: str, created: int, index: int, finish: str, state: ChoiceState
    ) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    def _extensions(self, prep: Prepared, data: dict[str, Any]) -> dict[str, Any]:
        """swapserve's fields on a chunk: `ab_arm` only on A/B traffic."""
        if prep.ab_arm is not None:
            data["ab_arm"] = prep.ab_arm
        return data

    async def stream(self, prep: Prepared, *, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events, OpenAI style, ending with `data: [DONE]`."""
        rid = prep.response_id or new_id(self.id_prefix)
        created = now()
        first: float | None = None
        outcome = "cancelled"
        choices = {i: ChoiceState() for i in range(prep.n_choices)}
        try:
            for data in self._opening_chunks(prep, rid, created):
                yield sse(data)
            aborted = False
            try:
                async for out in self._outputs(prep):
                    if first is None:
                        first = time.monotonic()
                    state = choices[out.index]
                    for data in self._delta_chunks(prep, rid, created, out, state):
                        yield sse(data)
                    state.add(out)
                    if out.finish_reason is not None:
                        for data in self._end_chunks(
                            prep, rid, created, out.index, out.finish_reason, state
                        ):
                            yield sse(data)
            except GenerationAborted:
                # Cut by the server's shutdown: each unfinished choice gets a final chunk
                # that says so, then usage and [DONE] as usual: the stream ends, not torn.
                aborted = True
                for i, state in choices.items():
                    if state.finish is None:
                        for data in self._end_chunks(prep, rid, created, i, ABORT, state):
                            yield sse(data)
            tokens = sum(c.tokens for c in choices.values())
            if include_usage:
                usage = self._usage(prep, tokens)
                yield sse(
                    {
                        "id": rid,
                        "object": self.chunk_object,
                        "created": created,
                        "model": prep.model,
                        "choices": [],
                        "usage": usage.model_dump(),
                    }
                )
            outcome = "aborted" if aborted else "ok"
            if prep.on_complete is not None and not aborted:
                prep.on_complete(choices[0].text)
            yield "data: [DONE]\n\n"
        except EngineError as exc:
            outcome = "error"
            err = from_engine_error(exc)
            yield sse(error_body(err.status, err.message, err.param, err.code))
            yield "data: [DONE]\n\n"
        except AdapterError as exc:  # e.g. unregistered while this request waited
            outcome = "error"
            yield sse(error_body(exc.status, exc.message, exc.param, exc.code))
            yield "data: [DONE]\n\n"
        except Exception:
            # a bug, not the caller's fault: still an ending the client can parse (the
            # response has started, so a 500 status can no longer be sent)
            outcome = "error"
            logger.exception("streamed generation failed")
            yield sse(error_body(500, "internal server error", None, "internal_error"))
            yield "data: [DONE]\n\n"
        finally:
            self._observe(
                prep,
                sum(len(p) for p in prep.prompts),
                sum(c.tokens for c in choices.values()),
                first,
                outcome,
            )


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


@contextlib.contextmanager
def passages_hint(opts: RAGOptions | None, citations: list[Citation] | None) -> Iterator[None]:
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
