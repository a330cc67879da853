"""LangChain's `ChatOpenAI` against the real server on the tiny model, as a LangChain user
points it at an OpenAI-compatible endpoint: invoke, stream, `with_structured_output` (a
pydantic model, by JSON schema and by a forced tool call) and `bind_tools` with a forced
tool. Skipped when langchain-openai is not installed (it is in the `test` extra)."""

from __future__ import annotations

from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from tests.support import start_live_server
from tests.tiny_model import build_tiny_model

langchain_openai = pytest.importorskip(
    "langchain_openai",
    reason="langchain-openai is not installed: pip install -e '.[test]' (or langchain-openai)",
)


class Person(BaseModel):
    """A person."""

    status: Literal["active", "inactive"]
    age: int = Field(ge=0, le=120)


class get_weather(BaseModel):  # noqa: N801 (a tool's name, as LangChain users write it)
    """Weather for a number of days."""

    unit: Literal["c", "f"]
    days: int = Field(ge=0, le=9)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A tiny model with a 2048-token context: tool definitions in the prompt take
    hundreds of tokens of the tiny, nearly byte-level tokenizer."""
    path = build_tiny_model(tmp_path_factory.mktemp("tiny-lc"), max_position_embeddings=2048)
    live = start_live_server(
        base_model=str(path),
        quantization="none",
        max_model_len=2048,
        default_max_tokens=16,
        data_dir=tmp_path_factory.mktemp("lc-data"),
    )
    yield live
    live.stop()


def _chat(server, **kwargs):
    return langchain_openai.ChatOpenAI(
        base_url=f"{server.url}/v1",
        api_key="unused",
        model="base",
        temperature=0,
        max_retries=0,
        **kwargs,
    )


def test_invoke_and_stream(server):
    llm = _chat(server, max_tokens=8)
    msg = llm.invoke("Hello there")
    assert isinstance(msg.content, str) and msg.content
    assert msg.response_metadata["finish_reason"] in ("stop", "length")
    chunks = list(llm.stream("Hello there"))
    assert "".join(c.content for c in chunks) == msg.content  # greedy: the same text


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output_returns_a_validated_object(server, method):
    llm = _chat(server, max_tokens=96).with_structured_output(Person, method=method)
    person = llm.invoke("Describe a person.")
    assert isinstance(person, Person)
    jsonschema.validate(person.model_dump(), Person.model_json_schema())


def test_bind_tools_with_a_forced_tool(server):
    llm = _chat(server, max_tokens=128).bind_tools([get_weather], tool_choice="get_weather")
    msg = llm.invoke("What is the weather?")
    assert msg.response_metadata["finish_reason"] == "tool_calls"
    assert [c["name"] for c in msg.tool_calls] == ["get_weather"]
    get_weather.model_validate(msg.tool_calls[0]["args"])
    # streamed: the chunks add up to the same call
    total = None
    for chunk in llm.stream("What is the weather?"):
        total = chunk if total is None else total + chunk
    assert total is not None
    assert [(c["name"], c["args"]) for c in total.tool_calls] == [
        (c["name"], c["args"]) for c in msg.tool_calls
    ]
