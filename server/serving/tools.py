"""Tool calling: `tools` + `tool_choice` -> the prompt's tool list, the grammar that forces
calls (`required` or a named function) and how the answer becomes `tool_calls`.

`auto` lets the model choose: the chat template shows it the tools and the call format,
and the parser reads calls out of its text. `required` and a named function are enforced
by constrained decoding: the output can only be one or more calls (one with
`parallel_tool_calls: false`, or for a named function) whose arguments validate against
the function's parameters, so any model, the bundled base included, answers with valid
tool_calls.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from server.engine.base import StructuredOutput
from server.engine.structured import compact_schema
from server.errors import APIError
from server.serving.tool_parsers import HermesParser, ParsedCall


@dataclass
class ToolPlan:
    """What a chat request with tools asks for."""

    tools: list[dict[str, Any]]  # OpenAI's tool objects, for the chat template
    mode: str  # "auto" | "required" | "named"
    grammar: StructuredOutput | None = None
    parser: type[HermesParser] = HermesParser
    names: list[str] = field(default_factory=list)

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        content, calls = self.parser.parse(text)
        if self.mode != "auto":
            content = None  # forced calls: nothing else was allowed
        return content, calls


def _functions(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise APIError(
                400, "each tool must be {type: 'function', function: {...}}", param=f"tools.{i}"
            )
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(400, "a function needs a name", param=f"tools.{i}.function.name")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise APIError(
                400,
                "parameters must be a JSON schema object",
                param=f"tools.{i}.function.parameters",
            )
        out.append({"name": fn["name"], "parameters": params})
    return out


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalItems", "not", "if", "then", "else", "contains")


def close_objects(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object that lists
    `properties` and says nothing about extra keys (as OpenAI's strict function calling
    asks). Every output of the result still validates against the original schema; without
    it a forced call lets a small model add invented keys until max_tokens."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: close_objects(v) for k, v in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [close_objects(v) for v in out[key]]
    for key in _SCHEMA_ONE:
        if isinstance(out.get(key), dict):
            out[key] = close_objects(out[key])
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = close_objects(out["additionalProperties"])
    elif (
        "properties" in out
        and "additionalProperties" not in out
        and "patternProperties" not in out
        and "unevaluatedProperties" not in out
    ):
        out["additionalProperties"] = False
    return out


def _call_schema(fn: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "name": {"const": fn["name"]},
            "arguments": close_objects(fn["parameters"]),
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def plan(
    tools: list[dict[str, Any]] | None, tool_choice: Any, parallel: bool | None
) -> ToolPlan | None:
    """None when no tool may be called (no tools, or tool_choice 'none')."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None
    if tool_choice == "none":
        return None
    fns = _functions(tools)
    names = [f["name"] for f in fns]
    if tool_choice in (None, "auto"):
        return ToolPlan(tools=tools, mode="auto", names=names)
    if tool_choice == "required":
        chosen = fns
        mode = "required"
    elif isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        match = [f for f in fns if f["name"] == name]
        if tool_choice.get("type") != "function" or not match:
            raise APIError(
                400,
                f"tool_choice names a function that is not in tools: {name!r} "
                f"(tools: {', '.join(names)})",
                param="tool_choice",
            )
        chosen = match
        mode = "named"
    else:
        raise APIError(
            400,
            "tool_choice must be 'none', 'auto', 'required' or "
            "{'type': 'function', 'function': {'name': ...}}",
            param="tool_choice",
        )
    one = (
        {"anyOf": [_call_schema(f) for f in chosen]} if len(chosen) > 1 else _call_schema(chosen[0])
    )
    call = f'"{HermesParser.open_tag}" %json {json.dumps(compact_schema(one))} "{HermesParser.close_tag}"'
    repeat = "" if mode == "named" or parallel is False else "+"
    grammar = f"start: call{repeat}\ncall: {call}\n"
    return ToolPlan(tools=tools, mode=mode, grammar=StructuredOutput(grammar=grammar), names=names)
