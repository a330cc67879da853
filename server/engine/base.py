"""The Engine protocol: what the HTTP layer may ask of a model runtime.

Engines know nothing of HTTP. Routes know nothing of torch. Everything that crosses the
line is plain data defined here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from server.engine.kinds.base import BaseModelShape

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch


class EngineError(Exception):
    """Base class for errors an engine reports; `status` hints the HTTP status to use."""

    status = 500
    code: str | None = None
    param: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        if param is not None:
            self.param = param
        if code is not None:
            self.code = code


class QueueFullError(EngineError):
    status = 429
    code = "queue_full"

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTimeoutError(EngineError):
    status = 504
    code = "timeout"


class UnknownAdapterError(EngineError):
    status = 404
    code = "model_not_found"
    param = "model"


class EngineShutdownError(EngineError):
    status = 503
    code = "shutting_down"


@dataclass
class StructuredOutput:
    """What the output must match (constrained decoding, server/engine/grammar.py).

    Exactly one field is set. Plain data, named as vLLM's `StructuredOutputsParams`
    (`json=`, `json_object=True`, `grammar=`), so an engine on vLLM maps it one to one.
    """

    json_schema: dict[str, Any] | None = None  # a JSON schema the output must validate against
    json_object: bool = False  # any JSON object (OpenAI's JSON mode)
    # a Lark grammar in llguidance's dialect (may embed `%json {schema}`); tool calls use it
    grammar: str | None = None

    def key(self) -> str:
        """A stable text for this spec: the compiled-grammar cache's key."""
        import json

        return json.dumps(
            {"s": self.json_schema, "o": self.json_object, "g": self.grammar},
            sort_keys=True,
            separators=(",", ":"),
        )


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    n: int = 1
    ignore_eos: bool = False  # benchmarks only: decode exactly max_tokens
    # Every field below maps onto vLLM's SamplingParams field of the same name.
    # The output must match this (None: free text).
    structured_outputs: StructuredOutput | None = None
    # token id -> added to its logit before sampling (OpenAI's logit_bias)
    logit_bias: dict[int, float] = field(default_factory=dict)
    # Log probabilities of each generated token, with this many most likely alternatives
    # (0: the chosen token's only; None: none). From the distribution the row sampled from:
    # after its adapter, penalties, logit_bias and the grammar mask; before temperature and
    # top_p. (The vllm engine: vLLM's raw logprobs, before logit_bias and penalties too.)
    logprobs: int | None = None
    # The prompt's own token logprobs (completions' echo), with this many alternatives.
    prompt_logprobs: int | None = None


@dataclass
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    adapter: str | None = None  # None = the base model
    timeout_s: float | None = None


@dataclass
class Logprob:
    token_id: int
    logprob: float | None  # None only for a prompt's first token: nothing comes before it
    token_bytes: bytes  # the token's own bytes (may be part of one UTF-8 character)


@dataclass
class TokenLogprobs:
    """One position: the token there, and the most likely tokens at it (most likely first)."""

    chosen: Logprob
    top: list[Logprob] = field(default_factory=list)


@dataclass
class GenerationOutput:
    """One step's news for one choice of a request."""

    index: int  # which of the n choices
    text: str  # new text since the last output of this choice
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | None while running
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # with sampling.logprobs: one entry per id in token_ids (a stop token is in neither)
    logprobs: list[TokenLogprobs] | None = None
    # with sampling.prompt_logprobs, on a choice's first output: one per prompt token (the
    # first one's logprob is None: nothing comes before it)
    prompt_logprobs: list[TokenLogprobs] | None = None


@dataclass
class EngineInfo:
    model_id: str
    engine: str
    device: str
    quantization: str
    max_model_len: int
    weights_bytes: int  # resident bytes of the base model's parameters and buffers
    fp32_bytes: int  # what the same parameters would take in float32
    num_parameters: int
    # rows of the input embedding: prompt token ids must be below it (None: unknown)
    vocab_size: int | None = None
    # whether adapters' trained token rows (PEFT's trainable_token_indices) are applied
    adapter_token_rows: bool = True
    runner: str | None = None  # how decode steps run, e.g. "fast" or "reference"
    # how each kind of weight is held, e.g. {"linear": "int4, group size 32", ...}
    weights_format: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class Engine(Protocol):
    """A model runtime serving one base model and any number of adapters."""

    @property
    def info(self) -> EngineInfo: ...

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> str:
        """The prompt text for OpenAI-style messages (and tools), with the chat template."""
        ...

    def tokenize(self, text: str) -> list[int]: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Stream outputs; closing the iterator early cancels the request."""
        ...

    def has_adapter(self, name: str) -> bool: ...

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear module of the base, by path."""
        ...

    def token_modules(self) -> dict[str, tuple[int, int]]:
        """(rows, dim) of the input embedding and output layer, by path (adapters may carry
        trained rows for a few tokens of these)."""
        ...

    def base_names(self) -> set[str]:
        """Names the base model is known by, to match an adapter's base_model_name_or_path."""
        ...

    def model_shape(self) -> BaseModelShape:
        """Everything adapter validation checks an adapter against: module shapes, float
        parameters, layers, KV heads, context length, names (server/engine/kinds/base.py)."""
        ...

    async def load_adapter(self, name: str, path: Path) -> None:
        """Put a validated adapter folder on the compute device under `name`; an adapter it
        cannot serve raises AdapterError (server/engine/kinds/base.py) saying why."""
        ...

    async def unload_adapter(self, name: str) -> None:
        """Forget the adapter everywhere (device and host memory)."""
        ...

    async def offload_adapter(self, name: str) -> None:
        """Move the adapter off the compute device, keeping a copy in host memory."""
        ...

    async def drop_host_copy(self, name: str) -> None: ...

    def stats(self) -> dict[str, float]:
        """Live numbers for /metrics: queue depth, running rows, tokens generated, ..."""
        ...
