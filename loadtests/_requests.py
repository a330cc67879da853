"""Request bodies and answer parsing for the OpenAI-style routes, shared by the locust
scenarios (loadtests/locustfile.py, loadtests/soak/locustfile.py) and the soak's runner.

Imported by locustfiles, so it must stay light: no torch, no server imports.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

CHAT_PATH = "/v1/chat/completions"
COMPLETION_PATH = "/v1/completions"


def request_body(
    model: str,
    prompt: str,
    *,
    chat: bool,
    max_tokens: int,
    temperature: float,
    stream: bool,
    rag: dict[str, Any] | None = None,
    user: str | None = None,
) -> dict[str, Any]:
    """A chat (one user message) or completions body; streamed ones ask for usage."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": stream,
    }
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if stream:
        body["stream_options"] = {"include_usage": True}
    if rag is not None:
        body["rag"] = rag
    if user is not None:
        body["user"] = user
    return body


def answer_text(data: dict[str, Any], *, chat: bool) -> str:
    """The generated text of a non-streamed answer's first choice."""
    choice = data["choices"][0]
    if chat:
        return (choice.get("message") or {}).get("content") or ""
    return choice.get("text") or ""


def chunk_text(event: dict[str, Any], *, chat: bool) -> str:
    """The generated text of one SSE chunk (role chunks and citations carry none)."""
    out = []
    for choice in event.get("choices") or []:
        if chat:
            out.append((choice.get("delta") or {}).get("content") or "")
        else:
            out.append(choice.get("text") or "")
    return "".join(out)


def sse_events(lines: Iterable[bytes | str]) -> Iterator[dict[str, Any] | None]:
    """The JSON events of a server-sent event stream, then None for `[DONE]` (and stop).
    A stream that ends without `[DONE]` just ends: the caller tells the two apart."""
    for raw in lines:
        line = raw.decode() if isinstance(raw, bytes) else raw
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            yield None
            return
        yield json.loads(data)


@dataclass
class TokenTimes:
    """When a streamed completion's tokens arrived, chunk by chunk (the ``openai`` SDK's
    completion chunks): the first and the last chunk with text, and the completion tokens
    the usage chunk counts."""

    first: float | None = None
    last: float | None = None
    tokens: int = 0

    def see(self, chunk: Any) -> None:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].text:
            self.first = self.first or now
            self.last = now
        if chunk.usage:
            self.tokens = chunk.usage.completion_tokens

    def decode_rate(self) -> float:
        """Tokens after the first over the time from the first to the last."""
        assert self.first is not None and self.last is not None and self.last > self.first
        return (self.tokens - 1) / (self.last - self.first)
