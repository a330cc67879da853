"""/v1/chat/completions: messages -> a prompt through the chat template, and the answer in
OpenAI's chat shapes (a ChatCompletion, or chat.completion.chunk events)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from server.errors import APIError
from server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    DeltaMessage,
    ResponseMessage,
    new_id,
    now,
)
from server.serving.base import ABORT, Prepared, ServingBase, passages_hint


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

    async def create(self, prep: Prepared) -> ChatCompletion:
        texts, finish, usage = await self.collect(prep)
        if prep.on_complete is not None and ABORT not in finish.values():
            prep.on_complete(texts.get(0, ""))
        choices = [
            ChatChoice(
                index=i,
                message=ResponseMessage(content=texts.get(i, "")),
                finish_reason=finish.get(i, "length"),  # type: ignore[arg-type]
            )
            for i in range(prep.n_choices)
        ]
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

    def _text_chunk(
        self, prep: Prepared, rid: str, created: int, index: int, text: str, finish: str | None
    ) -> dict[str, Any]:
        choice = ChatChunkChoice(
            index=index,
            delta=DeltaMessage(content=text),
            finish_reason=finish,  # type: ignore[arg-type]
        )
        return self._chunk(prep, rid, created, choice)

    def _end_chunk(
        self, prep: Prepared, rid: str, created: int, index: int, finish: str
    ) -> dict[str, Any]:
        choice = ChatChunkChoice(index=index, delta=DeltaMessage(), finish_reason=finish)  # type: ignore[arg-type]
        return self._chunk(prep, rid, created, choice)


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    """The request's messages as the chat template reads them: {role, content}."""
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
