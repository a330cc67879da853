"""Request bodies that FastAPI cannot infer, documented from the same pydantic models the
route validates with (server/schemas.py), so /openapi.json says what the route accepts.

A route that takes JSON *or* a multipart upload reads its body itself; its signature has
no body parameter, and `request_body` writes both media types into the operation.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def inline_schema(model: type[BaseModel], *, by_alias: bool = True) -> dict[str, Any]:
    """The model's JSON schema with its `$defs` inlined: a schema placed by hand into
    `openapi_extra` cannot point at `#/$defs/...`, which would resolve against the root
    of the OpenAPI document."""
    schema = model.model_json_schema(by_alias=by_alias)
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(schema)


def _form_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A multipart form: every field is a part; optional file parts are plain binaries
    (a form part cannot be null)."""
    schema = inline_schema(model)
    for prop in schema.get("properties", {}).values():
        options = prop.pop("anyOf", None)
        if options:
            first = next(o for o in options if o.get("type") != "null")
            prop.update(first)
        prop.pop("default", None) if prop.get("default") is None else None
    return schema


def request_body(
    *,
    json: type[BaseModel] | None = None,
    multipart: type[BaseModel] | None = None,
    description: str | None = None,
) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its own body."""
    content: dict[str, Any] = {}
    if json is not None:
        content["application/json"] = {"schema": inline_schema(json)}
    if multipart is not None:
        content["multipart/form-data"] = {"schema": _form_schema(multipart)}
    body: dict[str, Any] = {"required": True, "content": content}
    if description:
        body["description"] = description
    return {"requestBody": body}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """Error answers documented as `application/json` in the one error shape, also on a
    route whose own answer is HTML, plain text or JSONL (FastAPI would otherwise file a
    `model` under the route's media type). The `ErrorResponse` schema is a component
    because the JSON routes name it as their error model."""
    content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    return {code: {"content": content} for code in codes}
