"""/v1/chat/completions: messages -> a prompt through the chat template, and the answer in
OpenAI's chat shapes (a ChatCompletion, or chat.completion.chunk events)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from server.engine.base import GenerationOutput
from server.errors import APIError
from server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    DeltaMessage,
    FunctionCall,
    FunctionCallDelta,
    ResponseMessage,
    ToolCall,
    ToolCallDelta,
    new_id,
    now,
)
from server.serving import tools as tool_calls
from server.serving.base import ABORT, ChoiceState, Prepared, ServingBase, passages_hint
from server.serving.logprobs import chat_logprobs, check_count


class ServingChat(ServingBase):
    endpoint = "chat"
    id_prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"

    async def prepare(self, body: ChatCompletionRequest) -> Prepared:
        """Request -> Prepared: A/B routing, retrieval, validation, the prompt's token ids.

        The chat route and the A/B experiment runner both call this, so an arm with `rag`
        settings goes through the same routing, retrieval and validation as a client's
        request does."""
        body, routed = self._route_split(body)
        messages = None
        citations = None
        if body.rag is not None:
            # Retrieval before the prompt is built: `model` picks the behaviour (base or an
            # adapter), `rag` the knowledge.
            retrieval = self._retrieval(body)
            messages, citations = await retrieval.augment_chat(body.rag, chat_messages(body))
        with passages_hint(body.rag, citations):
            prep = self.prepare_messages(body, messages)
        prep.citations = citations
        if routed is not None:
            routed.attach(prep)
        return prep

    def prepare_messages(
        self, req: ChatCompletionRequest, messages: list[dict[str, str]] | None = None
    ) -> Prepared:
        """Validation and the prompt, for these messages (default: the request's own)."""
        adapter = self._check_common(req)
        if not req.messages:
            raise APIError(400, "messages must not be empty", param="messages")
        if messages is None:
            messages = chat_messages(req)
        plan = tool_calls.plan(req.tools, req.tool_choice, req.parallel_tool_calls)
        try:
            if plan is not None:
                prompt = self.engine.render_chat(messages, tools=plan.tools)
            else:
                prompt = self.engine.render_chat(messages)
        except Exception as exc:  # a template that rejects the conversation
            raise APIError(400, f"cannot format these messages: {exc}", param="messages") from exc
        ids = self.engine.tokenize(prompt)
        sampling = self._sampling(req, len(ids), "messages", adapter)
        sampling.structured_outputs = self._response_format(req.response_format)
        if plan is not None and plan.grammar is not None:
            if sampling.structured_outputs is not None:
                raise APIError(
                    400,
                    "response_format cannot be combined with a forced tool call "
                    "(tool_choice 'required' or a named function)",
                    param="response_format",
                )
            self._check_structured(plan.grammar, "tools")
            sampling.structured_outputs = plan.grammar
        sampling.logprobs = self._logprobs(req)
        prep = Prepared(model=req.model, adapter=adapter, prompts=[ids], sampling=sampling)
        prep.tools = plan
        return prep

    def _message(self, prep: Prepared, state: ChoiceState) -> tuple[ResponseMessage, str]:
        """The assistant message and finish reason: tool calls read out of the text."""
        finish = state.finish or "length"
        plan = prep.tools
        if plan is None:
            return ResponseMessage(content=state.text), finish
        content, calls = plan.parse(state.text)
        message = ResponseMessage(
            content=content,
            tool_calls=[
                ToolCall(
                    id=new_id("call"), function=FunctionCall(name=c.name, arguments=c.arguments)
                )
                for c in calls
            ]
            or None,
        )
        if calls and finish == "stop":
            finish = "tool_calls"
        return message, finish

    def _logprobs(self, req: ChatCompletionRequest) -> int | None:
        """Chat: `logprobs` true, with `top_logprobs` (0-20) alternatives per token."""
        if req.logprobs is not None and not isinstance(req.logprobs, bool):
            raise APIError(400, "logprobs must be true or false on chat", param="logprobs")
        if req.top_logprobs is not None:
            check_count(req.top_logprobs, "top_logprobs")
            if not req.logprobs:
                raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        if not req.logprobs:
            return None
        return req.top_logprobs or 0

    async def create(self, prep: Prepared) -> ChatCompletion:
        states, usage = await self.collect(prep)
        if prep.on_complete is not None and all(c.finish != ABORT for c in states.values()):
            prep.on_complete(states[0].text)
        choices = []
        for i, state in states.items():
            message, finish = self._message(prep, state)
            choices.append(
                ChatChoice(
                    index=i,
                    message=message,
                    finish_reason=finish,  # type: ignore[arg-type]
                    logprobs=chat_logprobs(state.logprobs)
                    if prep.sampling.logprobs is not None
                    else None,
                )
            )
        return ChatCompletion(
            id=prep.response_id or new_id(self.id_prefix),
            created=now(),
            model=prep.model,
            choices=choices,
            usage=usage,
            citations=prep.citations,
            ab_arm=prep.ab_arm,
        )

    # --- streaming --------------------------------------------------------------------------

    def _chunk(
        self, prep: Prepared, rid: str, created: int, choice: ChatChunkChoice
    ) -> dict[str, Any]:
        body = ChatCompletionChunk(id=rid, created=created, model=prep.model, choices=[choice])
        return self._extensions(prep, body.model_dump(exclude_none=False))

    def _opening_chunks(self, prep: Prepared, rid: str, created: int) -> Iterator[dict[str, Any]]:
        # Citations ride on the FIRST chunk (the role chunk of choice 0), a normal chunk of
        # the normal object type, so clients that know nothing of them parse the stream
        # unchanged (a separate event type breaks SDKs that parse every event as a chunk).
        for i in range(prep.n_choices):
            delta = DeltaMessage(role="assistant", content="")
            data = self._chunk(prep, rid, created, ChatChunkChoice(index=i, delta=delta))
            if i == 0 and prep.citations is not None:
                data["citations"] = [c.model_dump() for c in prep.citations]
            yield data

    def _delta_chunks(
        self, prep: Prepared, rid: str, created: int, out: GenerationOutput, state: ChoiceState
    ) -> Iterator[dict[str, Any]]:
        if not out.text and not out.logprobs:
            return
        # with tools, text is held until the choice ends: only then is it known which
        # parts are calls (sent as delta.tool_calls) and which are content
        text = None if prep.tools is not None else out.text
        if text is None and not out.logprobs:
            return
        choice = ChatChunkChoice(
            index=out.index,
            delta=DeltaMessage(content=text),
            logprobs=chat_logprobs(out.logprobs) if out.logprobs else None,
        )
        yield self._chunk(prep, rid, created, choice)

    def _end_chunks(
        self, prep: Prepared, rid: str, created: int, index: int, finish: str, state: ChoiceState
    ) -> Iterator[dict[str, Any]]:
        if prep.tools is not None and finish != ABORT:
            message, finish = self._message(prep, state)
            if message.content:
                delta = DeltaMessage(content=message.content)
                yield self._chunk(prep, rid, created, ChatChunkChoice(index=index, delta=delta))
            for i, call in enumerate(message.tool_calls or []):
                delta = DeltaMessage(
                    tool_calls=[
                        ToolCallDelta(
                            index=i,
                            id=call.id,
                            type="function",
                            function=FunctionCallDelta(
                                name=call.function.name, arguments=call.function.arguments
                            ),
                        )
                    ]
                )
                yield self._chunk(prep, rid, created, ChatChunkChoice(index=index, delta=delta))
        choice = ChatChunkChoice(index=index, delta=DeltaMessage(), finish_reason=finish)  # type: ignore[arg-type]
        yield self._chunk(prep, rid, created, choice)


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The request's messages as the chat template reads them: {role, content}, plus an
    assistant's `tool_calls` (arguments as objects) and a tool message's `tool_call_id`."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(req.messages):
        try:
            text = message.text()
        except ValueError as exc:
            raise APIError(400, str(exc), param=f"messages.{i}.content") from exc
        role = {"developer": "system"}.get(message.role, message.role)
        item: dict[str, Any] = {"role": role, "content": text}
        extra = message.model_extra or {}
        calls = extra.get("tool_calls")
        if calls:
            item["tool_calls"] = _history_calls(calls, f"messages.{i}.tool_calls")
        if role == "tool" and extra.get("tool_call_id") is not None:
            item["tool_call_id"] = extra["tool_call_id"]
        out.append(item)
    return out


def _history_calls(calls: Any, param: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise APIError(400, "tool_calls must be a list", param=param)
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise APIError(400, "a tool call needs function.name", param=f"{param}.{j}")
        args = fn.get("arguments", "{}")
        try:
            parsed = json.loads(args) if isinstance(args, str) else args
        except json.JSONDecodeError as exc:
            raise APIError(
                400, "function.arguments must be a JSON text", param=f"{param}.{j}.function"
            ) from exc
        out.append(
            {
                "id": call.get("id"),
                "type": "function",
                "function": {"name": fn["name"], "arguments": parsed},
            }
        )
    return out
