"""Every OpenAI request field is honoured or refused by name: never silently ignored.

Sent through the real `openai` SDK where it has the argument, so the field arrives the
way a client sends it.
"""

from __future__ import annotations

import openai
import pytest

from server.request_fields import ACCEPTED_HINTS, CHAT, COMPLETIONS
from tests.server.routes.test_openai import assert_error, post

MESSAGES = [{"role": "user", "content": "Hello world"}]
TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
}

# chat field -> a value a client would send that this server does not honour yet
CHAT_REFUSED = {
    "functions": [TOOL["function"]],
    "function_call": "auto",
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"},
    "reasoning_effort": "low",
    "verbosity": "low",
    "web_search_options": {},
    "moderation": {"policy": {"input": {"mode": "block"}}},
    "store": True,
    "service_tier": "flex",
}

COMPLETION_REFUSED = {
    "suffix": "end",
    "best_of": 3,
}


def test_the_table_covers_the_cases():
    assert {r.name for r in CHAT} == set(CHAT_REFUSED)
    assert {r.name for r in COMPLETIONS} == set(COMPLETION_REFUSED)


@pytest.mark.parametrize("name", sorted(CHAT_REFUSED))
def test_chat_field_refused_by_name(tiny_server, name):
    client = tiny_server.openai()
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="base", messages=MESSAGES, max_tokens=2, extra_body={name: CHAT_REFUSED[name]}
        )
    assert err.value.body["param"] == name
    assert err.value.body["code"] == "unsupported_field"
    assert name in err.value.body["message"]


@pytest.mark.parametrize("name", sorted(COMPLETION_REFUSED))
def test_completion_field_refused_by_name(tiny_server, name):
    r = post(
        tiny_server,
        "/v1/completions",
        {"model": "base", "prompt": "x", "max_tokens": 2, name: COMPLETION_REFUSED[name]},
    )
    assert_error(r, 400, name, code="unsupported_field")


def test_refused_stream_answers_400_before_any_chunk(tiny_server):
    client = tiny_server.openai()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="base", messages=MESSAGES, max_tokens=2, stream=True, reasoning_effort="low"
        )


def test_honoured_values_and_hints_are_accepted(tiny_server):
    """The values that change nothing (text format, tool_choice none, the default tier)
    and the labelling/caching hints answer 200."""
    client = tiny_server.openai()
    r = client.chat.completions.create(
        model="base",
        messages=MESSAGES,
        max_tokens=2,
        response_format={"type": "text"},
        tool_choice="none",
        modalities=["text"],
        service_tier="auto",
        store=False,
        logprobs=False,
        metadata={"team": "search"},
        user="u-1",
        parallel_tool_calls=False,
        prompt_cache_key="k",
        safety_identifier="s",
    )
    assert r.choices[0].message.content is not None
    assert set(ACCEPTED_HINTS) >= {"user", "metadata", "prompt_cache_key"}
    r2 = client.completions.create(model="base", prompt="x", max_tokens=2, best_of=1, echo=False)
    assert r2.choices[0].text is not None
