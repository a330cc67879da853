"""What the runner and the locust users share: prompts, request bodies, answer records.

Imported by the locustfile, so it must stay light (no torch, no server imports).
"""

from __future__ import annotations

import json
from typing import Any

# Every marker-checked request is greedy with a fixed prompt and max_tokens, so its answer
# on a given adapter's weights is known in advance (calibrated once, alone, at the start).
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Hello world, this is a test.",
    "Adapters change behaviour; retrieval brings knowledge.",
]
COMPLETION_PROMPTS = [
    "The quick brown fox",
    "One base model, many LoRA adapters,",
    "0 1 2 3 4",
]
RAG_PROMPTS = ["Which lighthouse is painted in red and white bands?"]
RAG_COLLECTION = "soak-kb"
RAG_DOCUMENTS = [
    {"id": "cape-wren", "text": "The lighthouse at Cape Wren was built in 1871 and is painted in red and white bands."},
    {"id": "swapserve", "text": "Swapserve keeps one 4-bit base model resident and serves many LoRA adapters per request."},
    {"id": "paris", "text": "Paris, the capital of France, is known for the Louvre, cafes and the Seine river."},
]  # fmt: skip
CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": CITY_SCHEMA,
    },
}

# kind -> (path, prompts); "chat_rag" runs on the base with the stable collection
MARKED_KINDS = {
    "chat": ("/v1/chat/completions", CHAT_PROMPTS),
    "completion": ("/v1/completions", COMPLETION_PROMPTS),
    "chat_rag": ("/v1/chat/completions", RAG_PROMPTS),
}


def marked_body(kind: str, model: str, prompt_i: int, max_tokens: int, stream: bool) -> dict:
    """The greedy request whose answer is checked against the adapter's marker."""
    _, prompts = MARKED_KINDS[kind]
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }
    if kind == "completion":
        body["prompt"] = prompts[prompt_i]
    else:
        body["messages"] = [{"role": "user", "content": prompts[prompt_i]}]
    if kind == "chat_rag":
        body["rag"] = {"collection": RAG_COLLECTION, "top_k": 1}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def answer_text(kind: str, data: dict) -> str:
    """The generated text of a non-streamed answer."""
    choice = data["choices"][0]
    if kind == "completion":
        return choice.get("text") or ""
    return (choice.get("message") or {}).get("content") or ""


def chunk_text(kind: str, event: dict) -> str:
    """The generated text of one SSE chunk (role chunks and citations carry none)."""
    out = []
    for choice in event.get("choices") or []:
        if kind == "completion":
            out.append(choice.get("text") or "")
        else:
            out.append((choice.get("delta") or {}).get("content") or "")
    return "".join(out)


def record_line(**fields: Any) -> str:
    return json.dumps(fields, separators=(",", ":")) + "\n"
