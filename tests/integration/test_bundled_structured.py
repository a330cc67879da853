"""Structured outputs on the bundled default base (SmolLM2-135M-Instruct, NF4), as a new user
tries them through the official `openai` client: `chat.completions.parse()` with a pydantic
model returns a validated object for three different schemas, and a forced tool call
(`tool_choice` naming a function) returns arguments that parse into the tool's model."""

from __future__ import annotations

from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

pytestmark = pytest.mark.integration


class City(BaseModel):
    name: str = Field(max_length=40)
    country: str = Field(max_length=40)
    size: Literal["small", "medium", "large"]


class Book(BaseModel):
    title: str = Field(max_length=60)
    author: str = Field(max_length=40)
    year: int = Field(ge=0, le=2100)
    genres: list[str] = Field(max_length=3)


class Ingredient(BaseModel):
    name: str = Field(max_length=30)
    grams: int = Field(ge=1, le=2000)


class Recipe(BaseModel):
    dish: str = Field(max_length=40)
    vegetarian: bool
    ingredients: list[Ingredient] = Field(min_length=1, max_length=4)


class GetWeather(BaseModel):
    """Weather in a city for a number of days."""

    city: str = Field(max_length=40)
    unit: Literal["c", "f"]
    days: int = Field(ge=1, le=7)


@pytest.mark.parametrize(
    ("schema", "question"),
    [
        (City, "Describe Paris as JSON."),
        (Book, "Give me a famous novel as JSON."),
        (Recipe, "A simple pancake recipe as JSON."),
    ],
    ids=["City", "Book", "Recipe"],
)
def test_parse_returns_a_validated_object(smollm2_server, schema, question):
    r = smollm2_server.openai().chat.completions.parse(
        model="base",
        messages=[{"role": "user", "content": question}],
        response_format=schema,
        max_tokens=160,
        temperature=0,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(choice.message.parsed, schema), choice.message.content
    # the text itself validates too (parse() already did, this says what came back)
    assert schema.model_validate_json(choice.message.content) == choice.message.parsed


def test_forced_tool_call_returns_parsed_arguments(smollm2_server):
    r = smollm2_server.openai().chat.completions.parse(
        model="base",
        messages=[{"role": "user", "content": "What will the weather be in Lyon this week?"}],
        tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice={"type": "function", "function": {"name": "GetWeather"}},
        max_tokens=96,
        temperature=0,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "GetWeather"
    assert isinstance(call.function.parsed_arguments, GetWeather), call.function.arguments
