"""A StructuredOutput as llguidance's grammar text, and its validation. No torch here:
the serving layer calls `check` to turn a schema the library cannot compile into a 400
before anything is queued; the engine (server/engine/grammar.py) compiles the same text
against the model's tokenizer.

JSON is compact (`{"a":1,"b":[2]}`: no whitespace between tokens). A small model that may
put spaces or newlines anywhere can fill its whole budget with them; without them every
token it writes is content.
"""

from __future__ import annotations

import json
from typing import Any

from server.engine.base import StructuredOutput

# llguidance's JSON options, over whatever a schema's own "x-guidance" says
JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ",",
    "key_separator": ":",
}


def compact_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with llguidance's compact-JSON options, for `%json` inside a grammar."""
    return {**schema, "x-guidance": JSON_OPTIONS}


def grammar_text(spec: StructuredOutput) -> str:
    """llguidance's grammar (a JSON text) for this spec."""
    from llguidance import LLMatcher

    if spec.json_schema is not None:
        return LLMatcher.grammar_from_json_schema(spec.json_schema, overrides=JSON_OPTIONS)  # type: ignore[arg-type]
    if spec.json_object:
        return LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)  # type: ignore[arg-type]
    if spec.grammar is not None:
        return LLMatcher.grammar_from_lark(spec.grammar)
    raise ValueError("a StructuredOutput needs json_schema, json_object or grammar")


def check(spec: StructuredOutput) -> str | None:
    """None if the library compiles this spec, else its error message."""
    from llguidance import LLMatcher

    try:
        text = grammar_text(spec)
    except (ValueError, TypeError) as exc:
        return str(exc)
    error = LLMatcher.validate_grammar(text)
    return error or None


def dumps(value: Any) -> str:
    """JSON as the grammar writes it (compact), for grammars that embed JSON literals."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
