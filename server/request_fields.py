"""Every field of OpenAI's chat and completions requests: honoured, or refused by name.

A client that sends `response_format`, `tools` or `logprobs` to a server that ignores them
gets free text back and no error: the silent failure this server exists to refuse. So
each field of OpenAI's request bodies is listed here with the values this server honours;
any other value is a 400 naming the field. A field leaves this table when the feature
that honours it lands. Fields OpenAI does not define are logged and ignored
(server/serving/base.py), as vLLM does with its extensions.

No torch here: this runs on the parsed request only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _absent(value: Any) -> bool:
    return value is None


def _false(value: Any) -> bool:
    return value is None or value is False


def _empty(value: Any) -> bool:
    return value is None or value == {} or value == []


@dataclass(frozen=True)
class FieldRule:
    name: str
    honoured: Callable[[Any], bool]
    reason: str


def _text_modalities(value: Any) -> bool:
    return value is None or value == ["text"]


def _default_tier(value: Any) -> bool:
    return value in (None, "auto", "default")


_NOT_YET = "is not supported by this server yet"

# Honoured, so in neither table: logit_bias, logprobs, top_logprobs, response_format
# (text, json_object, json_schema), tools, tool_choice, parallel_tool_calls, completions'
# echo.

CHAT: tuple[FieldRule, ...] = (
    FieldRule("functions", _empty, "functions (deprecated by OpenAI) is not supported: send tools"),
    FieldRule(
        "function_call",
        _absent,
        "function_call (deprecated by OpenAI) is not supported: send tool_choice",
    ),
    FieldRule("audio", _absent, "audio output is not supported: this server generates text"),
    FieldRule(
        "modalities",
        _text_modalities,
        "modalities other than ['text'] are not supported: this server generates text",
    ),
    FieldRule("prediction", _absent, f"prediction (predicted outputs) {_NOT_YET}"),
    FieldRule(
        "reasoning_effort",
        _absent,
        "reasoning_effort is not supported: the served models do not reason in a hidden budget",
    ),
    FieldRule("verbosity", _absent, "verbosity is not supported by this server"),
    FieldRule(
        "web_search_options", _absent, "web_search_options: web search is not supported here"
    ),
    FieldRule("moderation", _absent, "moderation is not supported by this server"),
    FieldRule("store", _false, "store is not supported: this server does not keep completions"),
    FieldRule(
        "service_tier",
        _default_tier,
        "this server has one service tier: service_tier may be 'auto' or 'default'",
    ),
)

COMPLETIONS: tuple[FieldRule, ...] = (
    FieldRule(
        "suffix",
        _absent,
        "suffix (text after the insertion point) is not supported: the served models have "
        "no fill-in-the-middle format",
    ),
    FieldRule("best_of", lambda v: v in (None, 1), f"best_of other than 1 {_NOT_YET}"),
)

# Accepted with no effect on the output, by design (the README's table says why):
# `user`, `safety_identifier` and `metadata` label a request (logged with its id);
# `prompt_cache_key`, `prompt_cache_options` and `prompt_cache_retention` are caching hints.
ACCEPTED_HINTS = (
    "user",
    "safety_identifier",
    "metadata",
    "prompt_cache_key",
    "prompt_cache_options",
    "prompt_cache_retention",
)


def refused_field(values: dict[str, Any], rules: tuple[FieldRule, ...]) -> FieldRule | None:
    """The first rule whose field carries a value this server does not honour."""
    for rule in rules:
        if not rule.honoured(values.get(rule.name)):
            return rule
    return None
