"""Schemathesis fuzzes the app's own OpenAPI document against the real server (real
uvicorn on a loopback port, tiny model, no API keys so that inputs reach the handlers
rather than stopping at 401). Rules: no 5xx, every 4xx in the OpenAI error shape, and
/health still answers after every case.

Left out on purpose: POST /train/<objective> (sft, dpo, orpo, kto) and /train/compare (a
valid body starts a real training process), the objectives' dry runs (the same body:
records the schema allows are rarely valid training data) and POST /ab/experiments (a valid
body starts a background run of generations); their validation is covered by
tests/server/routes/test_train.py, test_ab.py and tests/clients/test_client.py. Every
other route is fuzzed: openai, adapters, rag, the rest of ab, train's reads, ops.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation.modes import GenerationMode

from tests.rag.fake_embedder import FakeEmbedder
from tests.support import LiveServer, start_live_server
from tests.tiny_model import build_lora_adapter
from trainer.objectives import objective_names

# Examples per operation: the whole run stays around a minute on 2 shared cores. The
# generating routes get fewer (each valid case decodes up to max_model_len tokens).
# SWAPSERVE_FUZZ_EXAMPLES=N runs N per operation for a deeper look (minutes).
EXAMPLES = int(os.environ.get("SWAPSERVE_FUZZ_EXAMPLES", "6"))
GENERATING_EXAMPLES = min(EXAMPLES, 4) if "SWAPSERVE_FUZZ_EXAMPLES" not in os.environ else EXAMPLES
GENERATING = {"/v1/chat/completions", "/v1/completions"}
COLLECTION, ADAPTER, SPLIT = "kb", "fz", "sp"
# every objective's job route (sft, dpo, orpo, kto), its dry run (the same body: schema-valid
# records are not valid training data) and the method comparison
EXCLUDED = [
    *(("POST", f"/train/{kind}") for kind in objective_names()),
    *(("POST", f"/train/{kind}/dry_run") for kind in objective_names()),
    ("POST", "/train/compare"),
    ("POST", "/ab/experiments"),
]


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_path, tmp_path_factory) -> Iterator[LiveServer]:
    with pytest.MonkeyPatch.context() as mp:
        # RAG routes embed with the fake embedder: no sentence-transformers load here
        mp.setattr("server.retrieval.get_embedder", lambda path=None: FakeEmbedder())
        server = start_live_server(
            base_model=str(tiny_model_path),
            quantization="none",
            max_model_len=64,
            default_max_tokens=8,
            max_n=2,
            max_body_bytes=64 * 1024,
            data_dir=tmp_path_factory.mktemp("fuzz-data"),
        )
        # things for the cases to find (see `steer`): a collection, an adapter, a split
        adapter = build_lora_adapter(
            tiny_model_path, tmp_path_factory.mktemp("fuzz-adapter") / ADAPTER
        )
        for path, body in (
            ("/rag/collections", {"name": COLLECTION}),
            (
                f"/rag/collections/{COLLECTION}/documents",
                {"documents": [{"id": "d1", "text": "apples grow on trees"}]},
            ),
            ("/adapters", {"name": ADAPTER, "path": str(adapter)}),
            ("/ab/splits", {"name": SPLIT, "arms": [{"name": "a", "model": "base"}]}),
        ):
            r = httpx.post(f"{server.url}{path}", json=body, timeout=60)
            assert r.status_code in (200, 201), r.text
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            tf.add(adapter, arcname=ADAPTER)
        server.fuzz_adapter = (adapter, buf.getvalue())  # type: ignore[attr-defined]
        yield server
        server.stop()


def _openapi_document() -> dict:
    """The document the server serves at /openapi.json; building it needs no model."""
    from server.app import create_app
    from server.config import Settings

    with tempfile.TemporaryDirectory() as data_dir:
        return create_app(Settings(data_dir=Path(data_dir))).openapi()


# Read at import, so that each operation is a test of its own, named by its label.
# (schemathesis' own pytest loaders need pytest internals that pytest 9 no longer has.)
SCHEMA = schemathesis.openapi.from_dict(_openapi_document())
OPERATIONS = sorted(
    (op.method.upper(), op.path)
    for op in (result.ok() for result in SCHEMA.get_all_operations())
    if (op.method.upper(), op.path) not in EXCLUDED
)


def openai_error_shape(ctx, response, case) -> bool | None:
    """A 4xx carries {"error": {"message", "type", "param", "code"}}."""
    if not 400 <= response.status_code < 500:
        return None
    try:
        body = json.loads(response.content)
    except ValueError as exc:
        raise AssertionError(
            f"{response.status_code} body is not JSON: {response.content[:200]!r}"
        ) from exc
    error = body.get("error") if isinstance(body, dict) else None
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, body
    assert isinstance(error["message"], str) and error["message"], body
    return True


# "no server error" and the schema-conformance checks: a schema-valid request is not
# refused as malformed (400/422), an invalid one is, and every answer has a documented
# status, content type, headers and body.
# The generating routes also refuse schema-valid requests for reasons that depend on the
# server, not on the request's shape: limits set at start-up (n <= max_n, prompt plus
# max_tokens within the context window) and fields not implemented yet (400
# `unsupported_field`, the table in server/request_fields.py). Those refusals name their
# field; any other 400 to a schema-valid request still fails.
SERVER_LIMITS = {"n", "max_tokens", "max_completion_tokens", "messages", "prompt", "best_of"}


def accepted_or_server_limit(ctx, response, case) -> bool | None:
    if case.path in GENERATING and response.status_code == 400:
        error = json.loads(response.content).get("error") or {}
        if error.get("code") == "unsupported_field" or error.get("param") in SERVER_LIMITS:
            return True
    return positive_data_acceptance(ctx, response, case)


CHECKS = [
    not_a_server_error,
    openai_error_shape,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    accepted_or_server_limit,
]


def steer(case, data: st.DataObject, server: LiveServer) -> None:
    """Point most cases at things that exist. Random ids almost never name the base model,
    a collection or an adapter, so without this nearly every case would stop at a 404 and
    the code behind it (generation, retrieval, adapter use) would never be fuzzed."""
    # the first choice is hypothesis' simplest, which it draws most: steer then
    often = st.sampled_from([True, True, False])
    for key in list(case.path_parameters or {}):
        if key == "name" and data.draw(often):
            case.path_parameters[key] = data.draw(st.sampled_from([COLLECTION, ADAPTER, SPLIT]))
    body = case.body
    if not isinstance(body, dict):
        return
    if "model" in body and data.draw(often):
        if case.path == "/v1/embeddings":
            body["model"] = server.app.state.rag.embedder.model_id  # the one model that embeds
        else:
            body["model"] = data.draw(st.sampled_from(["base", ADAPTER, f"ab:{SPLIT}"]))
    # the embedder's size is the one `dimensions` it takes (the schema cannot know it)
    if case.path == "/v1/embeddings" and isinstance(body.get("dimensions"), int):
        if case.meta is not None and case.meta.generation.mode.is_positive:
            body["dimensions"] = FakeEmbedder().dim
    rag = body.get("rag")
    if isinstance(rag, dict) and data.draw(often):
        rag["collection"] = COLLECTION
    if "lora_name" in body and data.draw(often):
        body["lora_name"] = ADAPTER
    # What a schema cannot say: whether a folder on the server holds an adapter, or an
    # upload's bytes are an archive of one. Schema-valid cases get a real one, or (paths)
    # a path that does not exist, so that their refusals are about what the schema does say.
    if case.meta is not None and case.meta.generation.mode.is_positive:
        folder, archive = server.fuzz_adapter  # type: ignore[attr-defined]
        if isinstance(body.get("file"), bytes | str):
            body["file"] = archive
        for key in ("path", "lora_path"):
            if isinstance(body.get(key), str):
                body[key] = data.draw(st.sampled_from([str(folder), "/nonexistent/adapter"]))
        # rules across two fields, which JSON Schema cannot state (documented in words): a
        # completion under a split or with `rag` takes one prompt string
        if (str(body.get("model", "")).startswith("ab:") or body.get("rag")) and not isinstance(
            body.get("prompt", ""), str
        ):
            body["prompt"] = "Hello"
        chunk, overlap = body.get("chunk_tokens"), body.get("overlap")
        if isinstance(overlap, int):
            body["overlap"] = min(overlap, (chunk if isinstance(chunk, int) else 200) // 2 - 1)


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_openapi_fuzz(method: str, path: str, fuzz_server: LiveServer) -> None:
    operation = SCHEMA[path][method]
    examples = GENERATING_EXAMPLES if path in GENERATING else EXAMPLES

    # schema-valid requests and invalid ones (wrong types, missing fields...)
    cases = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    )

    @given(case=cases, data=st.data())
    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,  # the same cases on every run: a CI failure reproduces locally
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case, data) -> None:
        steer(case, data, fuzz_server)
        response = case.call(base_url=fuzz_server.url, timeout=60)
        case.validate_response(response, checks=CHECKS)
        assert httpx.get(f"{fuzz_server.url}/health", timeout=10).status_code == 200

    fuzz()
