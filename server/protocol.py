"""Pydantic models mirroring OpenAI's chat, completions and embeddings schemas.

Unknown fields are accepted (clients send many) and logged, never silently relied on.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

# The error shape and the `rag` extension are declared with the bodies clients/ shares.
from server.schemas import ErrorDetail, ErrorResponse, RAGOptions  # noqa: F401

MAX_STOP = 4


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow")

    @property
    def unknown_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


class StreamOptions(BaseModel):
    include_usage: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str  # any string here, so that an image part is refused by name (text() below)
    text: str | None = None


# What the schema documents: text parts only (the models served read text). Other parts
# (image_url, input_audio, file) are refused with a 400 naming their type.
TEXT_PART_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    "required": ["type", "text"],
}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Annotated[ContentPart, WithJsonSchema(TEXT_PART_SCHEMA)]] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text":
                raise ValueError(f"content parts of type {part.type!r} are not supported")
            if part.text is None:
                raise ValueError("a text content part needs a string 'text'")
            parts.append(part.text)
        return "".join(parts)


class Citation(BaseModel):
    """One retrieved passage, numbered as in the prompt (`[1]`, `[2]`...)."""

    index: int
    doc_id: str
    chunk_index: int
    score: float
    snippet: str
    char_start: int | None = None
    char_end: int | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


STOP_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {
            "type": "array",
            "items": {"type": "string", "minLength": 1},
            "maxItems": MAX_STOP,
        },
        {"type": "null"},
    ]
}


class SamplingFields(OpenAIModel):
    """Fields shared by chat and completions requests."""

    model: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # the schema states what the validator below enforces, so a client generated from it
    # never sends a stop list the server refuses
    stop: Annotated[str | list[str] | None, WithJsonSchema(STOP_SCHEMA)] = None
    max_tokens: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = None
    user: str | None = None
    logprobs: bool | int | None = None
    logit_bias: dict[str, float] | None = None
    # Fields below this line are refused unless their value is one this server honours
    # (server/request_fields.py says which): declared, so /openapi.json shows them.
    # vLLM's extension, for benchmarks: decode exactly max_tokens, ignoring end-of-sequence
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @property
    def stop_list(self) -> list[str]:
        stop = self.stop
        if stop is None:
            return []
        return [stop] if isinstance(stop, str) else list(stop)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    prompt_cache_retention: str | None = None
    rag: RAGOptions | None = None  # swapserve extension: retrieval, see rag/

    @model_validator(mode="after")
    def _one_budget(self) -> ChatCompletionRequest:
        if self.max_completion_tokens is not None and self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self


# What the completion route accepts (server/serving/completion.py refuses an empty prompt and
# negative token ids): documented, so a client generated from /openapi.json sends neither.
_TOKENS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
PROMPT_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
        _TOKENS,
        {"type": "array", "items": _TOKENS, "minItems": 1},
    ],
    "title": "Prompt",
}


class CompletionRequest(SamplingFields):
    prompt: Annotated[str | list[str] | list[int] | list[list[int]], WithJsonSchema(PROMPT_SCHEMA)]
    # completions' logprobs: how many alternatives per token, as OpenAI's 0-5 widened to 20
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    # vLLM's extension: structured outputs on completions too (chat's shape)
    response_format: dict[str, Any] | None = None
    suffix: str | None = None
    best_of: int | None = None
    rag: RAGOptions | None = None  # swapserve extension: retrieval, see rag/


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit on inputs per request

_Text = Annotated[str, Field(min_length=1)]
_TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class EmbeddingRequest(OpenAIModel):
    """OpenAI's embeddings request. Token arrays are ids of the embedding model's own
    tokenizer (as vLLM takes them), not of OpenAI's tiktoken."""

    model: str
    input: (
        _Text
        | Annotated[list[_Text], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
        | _TokenIds
        | Annotated[list[_TokenIds], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
    ) = Field(
        description="A string, a list of strings, or token ids (one list, or a list of "
        "lists) of the embedding model's own tokenizer; none empty, at most "
        f"{MAX_EMBEDDING_INPUTS} inputs. Each must fit the embedding model's input length."
    )
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: each vector as little-endian float32 bytes."
    )
    dimensions: int | None = Field(
        None, description="Only the model's native size is accepted (no shortening)."
    )
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _check_input(cls, value: Any) -> Any:
        # One message that names what is wrong, where the union's own errors would list a
        # failure per branch ("input.str: ... (and 4 more problems)").
        def token(t: Any) -> bool:  # JSON's integers, 7.0 included (as JSON Schema has it)
            if isinstance(t, float):
                return t.is_integer()
            return isinstance(t, int) and not isinstance(t, bool)

        def ids(v: Any) -> bool:
            return isinstance(v, list) and all(map(token, v))

        if isinstance(value, str):
            items: list[Any] = [value]
        elif isinstance(value, list) and (
            all(isinstance(v, str) for v in value) or all(map(ids, value))
        ):
            items = value
        elif ids(value):
            items = [value]
        else:
            raise ValueError(
                "must be a string, a list of strings, a list of token ids, or a list of lists "
                "of token ids"
            )
        if not items:
            raise ValueError("must not be empty")
        if len(items) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"has {len(items)} items; at most {MAX_EMBEDDING_INPUTS}")
        for i, item in enumerate(items):
            if len(item) == 0:
                raise ValueError(f"input[{i}] is empty; every input needs text or tokens")
            if not isinstance(item, str) and min(item) < 0:
                raise ValueError(f"input[{i}] holds a negative token id")
        return value


# --- responses ------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length", "tool_calls", "abort"]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    """Chat's `choices[].logprobs`: one entry per generated token."""

    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    """Completions' `choices[].logprobs` (the legacy shape lm-evaluation-harness reads)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: FinishReason | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    # swapserve extension: the passages retrieved for `rag` requests ([] = none matched)
    citations: list[Citation] | None = None
    ab_arm: str | None = None  # swapserve extension: the A/B arm that served `ab:<split>`


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    citations: list[Citation] | None = None  # swapserve extension, as on ChatCompletion
    ab_arm: str | None = None  # swapserve extension, as on ChatCompletion


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "swapserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    # swapserve extension: what the model serves, "generate" (chat, completions: the base
    # and every adapter) or "embed" (/v1/embeddings: the RAG embedder)
    task: Literal["generate", "embed"] = "generate"


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # a base64 string with encoding_format "base64"


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
