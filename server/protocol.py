"""Pydantic models mirroring OpenAI's chat, completions and embeddings schemas.

Unknown fields are accepted (clients send many) and logged, never silently relied on.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content parts of type {part.type!r} are not supported")
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


class SamplingFields(OpenAIModel):
    """Fields shared by chat and completions requests."""

    model: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
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
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    top_logprobs: int | None = None
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


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    rag: RAGOptions | None = None  # swapserve extension: retrieval, see rag/


class EmbeddingRequest(OpenAIModel):
    """OpenAI's embeddings request. Token arrays are ids of the embedding model's own
    tokenizer (as vLLM takes them), not of OpenAI's tiktoken."""

    model: str
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="A string, a list of strings, or token ids (one list, or a list of "
        "lists) of the embedding model's own tokenizer."
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
    def _one_input_type(cls, value: Any) -> Any:
        # one message naming `input`, rather than one per branch of the union
        def ids(v: Any) -> bool:
            return isinstance(v, list) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in v
            )

        if isinstance(value, str) or (
            isinstance(value, list)
            and (all(isinstance(v, str) for v in value) or ids(value) or all(map(ids, value)))
        ):
            return value
        raise ValueError(
            "must be a string, a list of strings, a list of token ids, or a list of lists of "
            "token ids"
        )


# --- responses ------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: Literal["stop", "length", "abort"] | None
    logprobs: None = None


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


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: Literal["stop", "length", "abort"] | None = None
    logprobs: None = None


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
    finish_reason: Literal["stop", "length", "abort"] | None
    logprobs: None = None


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
