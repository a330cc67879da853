"""Structured outputs on the tiny model, through the real server and the `openai` SDK:
every answer parses and validates against its schema (jsonschema), or stops at
max_tokens with finish_reason "length"; a schema the grammar library cannot compile is a
400 naming response_format; constrained and free rows on different adapters share one
batch and each equals its run alone."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from tests.server.routes.test_openai import assert_error, post

MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]


def _obj(properties: dict, **extra) -> dict:
    return {
        "type": "object",
        "properties": properties,
        "required": sorted(properties),
        "additionalProperties": False,
        **extra,
    }


SCHEMAS = {
    "nested_objects": _obj(
        {"name": {"type": "string", "maxLength": 8}, "address": _obj({"zip": {"type": "integer"}})}
    ),
    "arrays": _obj(
        {"tags": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3}}
    ),
    "enums": _obj(
        {"status": {"enum": ["active", "inactive", "banned"]}, "ok": {"type": "boolean"}}
    ),
    "numbers": _obj(
        {
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "score": {"type": "number", "minimum": -1, "maximum": 1},
        }
    ),
    "any_of": _obj(
        {"value": {"anyOf": [{"type": "integer"}, {"type": "null"}, {"enum": ["none"]}]}}
    ),
}


def _format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}


def _check(text: str, finish: str, schema: dict | None) -> None:
    if finish == "length":
        return  # cut by max_tokens: the only way an answer may not parse
    assert finish == "stop"
    value = json.loads(text)
    if schema is None:
        assert isinstance(value, dict)
    else:
        jsonschema.validate(value, schema)


@pytest.mark.parametrize("family", sorted(SCHEMAS))
def test_every_answer_validates_chat_streamed_and_not(tiny_server, family):
    schema = SCHEMAS[family]
    client = tiny_server.openai()
    stops = 0
    for seed in range(3):
        kwargs = dict(
            model="base",
            messages=MESSAGES,
            max_tokens=96,
            temperature=1.0,
            seed=seed,
            response_format=_format(schema),
        )
        r = client.chat.completions.create(**kwargs)
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        _check(text, finish, schema)
        stops += finish == "stop"
        chunks = list(client.chat.completions.create(**kwargs, stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == text  # same seed, same answer
    assert stops >= 1  # the grammar closes the object: not every answer runs out of tokens


def test_json_object_mode_and_completions(tiny_server):
    client = tiny_server.openai()
    r = client.chat.completions.create(
        model="base",
        messages=MESSAGES,
        max_tokens=64,
        temperature=0,
        response_format={"type": "json_object"},
    )
    _check(r.choices[0].message.content, r.choices[0].finish_reason, None)
    schema = SCHEMAS["enums"]
    c = client.completions.create(
        model="base",
        prompt="A person:",
        max_tokens=64,
        temperature=0,
        extra_body={"response_format": _format(schema)},
    )
    _check(c.choices[0].text, c.choices[0].finish_reason, schema)
    streamed = client.completions.create(
        model="base",
        prompt="A person:",
        max_tokens=64,
        temperature=0,
        stream=True,
        extra_body={"response_format": _format(schema)},
    )
    assert "".join(x.choices[0].text for x in streamed if x.choices) == c.choices[0].text


def test_max_tokens_cut_is_length(tiny_server):
    r = tiny_server.openai().chat.completions.create(
        model="base",
        messages=MESSAGES,
        max_tokens=3,
        temperature=0,
        response_format=_format(SCHEMAS["nested_objects"]),
    )
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content.startswith("{")


def test_sdk_parse_returns_a_validated_object(tiny_server):
    from typing import Literal

    from pydantic import BaseModel

    class Answer(BaseModel):
        ok: bool
        status: Literal["active", "inactive"]

    r = tiny_server.openai().chat.completions.parse(
        model="base", messages=MESSAGES, max_tokens=64, temperature=0, response_format=Answer
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(r.choices[0].message.parsed, Answer)


@pytest.mark.parametrize(
    "response_format, param",
    [
        (_format({"$ref": "#/$defs/missing"}), "response_format"),
        (_format({"type": "string", "format": "no-such-format"}), "response_format"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema"),
        ({"type": "xml"}, "response_format.type"),
    ],
)
def test_bad_response_format_is_400(tiny_server, response_format, param):
    for path, body in (
        ("/v1/chat/completions", {"messages": MESSAGES}),
        ("/v1/completions", {"prompt": "x"}),
    ):
        r = post(tiny_server, path, {"model": "base", "response_format": response_format, **body})
        assert_error(r, 400, param)


@pytest.fixture(scope="module")
def two_adapters(tiny_server, tiny_model_path, tmp_path_factory):
    from tests.tiny_model import build_lora_adapter

    names = []
    for i, name in enumerate(("json-a", "json-b")):
        path = build_lora_adapter(tiny_model_path, tmp_path_factory.mktemp(name), r=4, seed=10 + i)
        r = post(tiny_server, "/adapters", {"name": name, "path": str(path), "replace": True})
        assert r.status_code in (200, 201), r.text
        names.append(name)
    return names


def test_constrained_and_free_rows_on_different_adapters_share_a_batch(tiny_server, two_adapters):
    """Greedy: each request gives in the mixed batch exactly what it gives alone."""
    client = tiny_server.openai()
    schema = SCHEMAS["numbers"]
    requests = [
        dict(model="json-a", response_format=_format(schema)),
        dict(model="json-b"),
        dict(model="base", response_format={"type": "json_object"}),
        dict(model="json-b", response_format=_format(SCHEMAS["enums"])),
        dict(model="json-a"),
    ]

    def run(extra: dict) -> tuple[str, str]:
        r = client.chat.completions.create(messages=MESSAGES, max_tokens=48, temperature=0, **extra)
        return r.choices[0].message.content, r.choices[0].finish_reason

    alone = [run(extra) for extra in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(run, requests))
    assert together == alone
    _check(*alone[0], schema)
    _check(*alone[3], SCHEMAS["enums"])
    assert alone[1] != alone[4]  # the two adapters differ


def test_unknown_adapter_with_a_schema_is_still_404(tiny_server):
    with pytest.raises(openai.NotFoundError):
        tiny_server.openai().chat.completions.create(
            model="nope", messages=MESSAGES, response_format={"type": "json_object"}
        )
