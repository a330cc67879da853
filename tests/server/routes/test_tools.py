"""Tool calling on the tiny model through the real server and the `openai` SDK: forced
calls (`required`, a named function) are valid whatever the model, streamed and not;
tool history is rendered by the chat template; bad tool input is a 400."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.server.routes.test_openai import assert_error, post
from tests.support import start_live_server
from tests.tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    """The tools' JSON in the prompt takes ~450 tokens of the tiny tokenizer (byte-level,
    few merges), a forced call ~70 more: a tiny model with a 2048-token context (the shared
    tiny model stops at 512 positions)."""
    path = build_tiny_model(tmp_path_factory.mktemp("tiny-long"), max_position_embeddings=2048)
    server = start_live_server(
        base_model=str(path),
        quantization="none",
        max_model_len=2048,
        default_max_tokens=16,
        data_dir=tmp_path_factory.mktemp("tools-data"),
    )
    yield server
    server.stop()


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "unit": {"enum": ["c", "f"]},
                "days": {"type": "integer", "minimum": 0, "maximum": 9},
            },
            "required": ["unit", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"utc": {"type": "boolean"}},
            "required": ["utc"],
            "additionalProperties": False,
        },
    },
}
MESSAGES = [{"role": "user", "content": "What is the weather?"}]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


def _valid(calls, allowed: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


@pytest.mark.parametrize(
    "tool_choice, allowed",
    [
        ("required", {"get_weather", "get_time"}),
        ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
    ],
)
def test_forced_tool_calls_streamed_and_not(tiny_server, tool_choice, allowed):
    client = tiny_server.openai()
    kwargs = dict(
        model="base",
        messages=MESSAGES,
        tools=[WEATHER, TIME],
        tool_choice=tool_choice,
        max_tokens=128,  # a call is 64-74 tokens of the tiny, nearly byte-level tokenizer
        temperature=0,
        parallel_tool_calls=False,
    )
    r = client.chat.completions.create(**kwargs)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    _valid(choice.message.tool_calls, allowed)
    assert len(choice.message.tool_calls) == 1
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    deltas = [
        tc
        for c in chunks
        if c.choices and c.choices[0].delta.tool_calls
        for tc in c.choices[0].delta.tool_calls
    ]
    assert [(d.function.name, d.function.arguments) for d in deltas] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls
    ]
    assert [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ] == ["tool_calls"]


def test_tool_history_is_rendered_and_auto_answers(tiny_server):
    messages = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call-1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"unit":"c","days":1}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call-1", "content": "sunny, 21 C"},
    ]
    r = tiny_server.openai().chat.completions.create(
        model="base", messages=messages, tools=[WEATHER], max_tokens=8, temperature=0
    )
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_hermes_parser_reads_calls_and_content():
    from server.serving.tool_parsers import HermesParser

    content, calls = HermesParser.parse(
        'Sure. <tool_call>{"name":"get_time","arguments":{"utc":true}}</tool_call>'
    )
    assert content == "Sure."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_time", {"utc": True})]


@pytest.mark.parametrize(
    "extra, param",
    [
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [{"type": "function", "function": {"parameters": {}}}]},
            "tools.0.function.name",
        ),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/x"}}}
                ],
                "tool_choice": "required",
            },
            "tools",
        ),
        (
            {
                "tools": [WEATHER],
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "response_format",
        ),
    ],
)
def test_bad_tool_input_is_400(tiny_server, extra, param):
    r = post(tiny_server, "/v1/chat/completions", {"model": "base", "messages": MESSAGES, **extra})
    assert_error(r, 400, param)


def test_unknown_function_through_the_sdk(tiny_server):
    with pytest.raises(openai.BadRequestError) as err:
        tiny_server.openai().chat.completions.create(
            model="base",
            messages=MESSAGES,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    assert err.value.body["param"] == "tool_choice"


def test_forced_calls_close_open_objects():
    """An object schema silent on extra keys gets none in a forced call (its outputs still
    validate against the original); explicit additionalProperties and enum values are kept."""
    from server.serving.tools import close_objects

    schema = {
        "type": "object",
        "properties": {
            "where": {"type": "object", "properties": {"city": {"type": "string"}}},
            "tags": {"type": "array", "items": {"properties": {"k": {"type": "string"}}}},
            "extra": {"type": "object", "additionalProperties": {"type": "integer"}},
            "kind": {"enum": [{"properties": 1}]},
        },
        "$defs": {"d": {"properties": {"x": {}}}},
        "anyOf": [{"properties": {"a": {}}}],
    }
    closed = close_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["where"]["additionalProperties"] is False
    assert closed["properties"]["tags"]["items"]["additionalProperties"] is False
    assert closed["properties"]["extra"]["additionalProperties"] == {"type": "integer"}
    assert closed["properties"]["kind"] == {"enum": [{"properties": 1}]}
    assert closed["$defs"]["d"]["additionalProperties"] is False
    assert closed["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the caller's schema is not changed


def test_forced_call_on_open_parameters_ends(tiny_server):
    """Parameters without additionalProperties (what LangChain and most clients send): the
    random tiny model still ends with a call instead of inventing keys until max_tokens."""
    open_weather = json.loads(json.dumps(WEATHER))
    del open_weather["function"]["parameters"]["additionalProperties"]
    r = tiny_server.openai().chat.completions.create(
        model="base",
        messages=MESSAGES,
        tools=[open_weather],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=128,
        temperature=0,
    )
    assert r.choices[0].finish_reason == "tool_calls"
    _valid(r.choices[0].message.tool_calls, {"get_weather"})
