"""What the runner and the locust users share: prompts, request bodies, answer records.

Imported by the locustfile, so it must stay light (no torch, no server imports).
"""

from __future__ import annotations

import json
from typing import Any

from loadtests._requests import CHAT_PATH, COMPLETION_PATH, request_body
from loadtests._requests import answer_text as _answer_text
from loadtests._requests import chunk_text as _chunk_text

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
    "chat": (CHAT_PATH, CHAT_PROMPTS),
    "completion": (COMPLETION_PATH, COMPLETION_PROMPTS),
    "chat_rag": (CHAT_PATH, RAG_PROMPTS),
}
# the A/B split the soak sends traffic through (its arms: see run.register_initial)
SPLIT = "soak-split"


def marked_body(
    kind: str, model: str, prompt_i: int, max_tokens: int, stream: bool, user: str | None = None
) -> dict:
    """The greedy request whose answer is checked against the adapter's marker."""
    _, prompts = MARKED_KINDS[kind]
    rag = {"collection": RAG_COLLECTION, "top_k": 1} if kind == "chat_rag" else None
    return request_body(model, prompts[prompt_i], chat=kind != "completion",
                        max_tokens=max_tokens, temperature=0, stream=stream, rag=rag,
                        user=user)  # fmt: skip


def answer_text(kind: str, data: dict) -> str:
    """The generated text of a non-streamed answer."""
    return _answer_text(data, chat=kind != "completion")


def chunk_text(kind: str, event: dict) -> str:
    """The generated text of one SSE chunk (role chunks and citations carry none)."""
    return _chunk_text(event, chat=kind != "completion")


def record_line(**fields: Any) -> str:
    return json.dumps(fields, separators=(",", ":")) + "\n"
