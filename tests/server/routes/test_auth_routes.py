"""Authentication through the real server and the real `openai` SDK: keys, scopes of every
mounted route, allow-lists, and per-key limits."""

from __future__ import annotations

import json
import logging
import re
import time

import httpx
import openai
import pytest
from fastapi import APIRouter, FastAPI

from server.auth import ADMIN, INFERENCE, PUBLIC, add_key_to_file, route_scopes
from tests.support import start_live_server
from tests.tiny_model import build_lora_adapter

ADMIN_KEY = "ss-test-admin-6b1f0c2e9a7d4853"
INFER_KEY = "ss-test-infer-3e8a5d1c7f0b2964"
WRONG_KEY = "ss-test-wrong-0000111122223333"
CHAT = [{"role": "user", "content": "Hello world"}]

# FastAPI's own documentation routes: plain Starlette routes, open on purpose (the OpenAPI
# document describes the API, it grants nothing)
DOCS_PATHS = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}

# What the routes known today must require; routes mounted later are still checked for
# having *a* scope, and that the scope it declares is enforced.
EXPECTED = {
    "/v1/chat/completions": INFERENCE,
    "/v1/completions": INFERENCE,
    "/v1/models": INFERENCE,
    "/v1/embeddings": INFERENCE,
    "/adapters": ADMIN,
    "/adapters/{name}": ADMIN,
    "/v1/load_lora_adapter": ADMIN,
    "/v1/unload_lora_adapter": ADMIN,
    "/metrics": ADMIN,
    "/health": PUBLIC,
    "/ready": PUBLIC,
    "/rag/collections": ADMIN,
    "/rag/collections/{name}/search": INFERENCE,
}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def routes_by_scope(app: FastAPI) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(method, path, scope) for every route, and the routes that declare no scope."""
    scoped: list[tuple[str, str, str]] = []
    undeclared: list[str] = []
    for route in route_scopes(app):
        if route.scopes is None and route.path in DOCS_PATHS:
            continue
        if route.scopes is None or len(route.scopes) != 1:
            undeclared.append(f"{sorted(route.methods)} {route.path} scopes={route.scopes}")
            continue
        (scope,) = route.scopes
        scoped.extend((method, route.path, scope) for method in sorted(route.methods))
    return scoped, undeclared


def call(server, method: str, path: str, key: str | None) -> httpx.Response:
    url = server.url + re.sub(r"\{[^}]+\}", "no-such-thing", path)
    # an empty JSON object: enough to get past body parsing to the scope check
    body = {"json": {}} if method in ("POST", "PUT", "PATCH") else {}
    headers = bearer(key) if key else {}
    return httpx.request(method, url, headers=headers, timeout=30, **body)


def assert_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    return error


@pytest.fixture(scope="module")
def adapters(tiny_model_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("auth-adapters")
    return {n: build_lora_adapter(tiny_model_path, root / n, seed=i) for i, n in enumerate("ab")}


@pytest.fixture(scope="module")
def server(tiny_model_path, tmp_path_factory, adapters):
    data = tmp_path_factory.mktemp("auth-data")
    # a key in the default keys file (<data_dir>/api_keys.json), allowed adapter "a" only
    limited_key = add_key_to_file(data / "api_keys.json", "tenant-a", [INFERENCE], models=["a"])
    server = start_live_server(
        base_model=str(tiny_model_path),
        quantization="none",
        max_model_len=256,
        default_max_tokens=8,
        data_dir=data,
        api_keys=json.dumps(
            [
                {"key": ADMIN_KEY, "name": "ops", "scopes": ["admin"]},
                {"key": INFER_KEY, "name": "app", "scopes": ["inference"]},
            ]
        ),
    )
    server.limited_key = limited_key
    server.tenant_b_key = add_key_to_file(
        data / "api_keys.json", "tenant-b", [INFERENCE], collections=["mine"]
    )
    for name, path in adapters.items():
        r = httpx.post(
            f"{server.url}/adapters",
            json={"name": name, "path": str(path)},
            headers=bearer(ADMIN_KEY),
            timeout=60,
        )
        assert r.status_code == 201, r.text
    yield server
    server.stop()


# --- the openai client ------------------------------------------------------------------------


def test_openai_client_with_an_inference_key(server):
    client = server.openai(api_key=INFER_KEY)
    r = client.chat.completions.create(model="base", messages=CHAT, max_tokens=3)
    assert r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens >= 1
    ids = [m.id for m in client.models.list().data]
    assert ids == ["base", "all-MiniLM-L6-v2", "a", "b"]
    # /v1/embeddings is an inference route too
    embedded = client.embeddings.create(model="all-MiniLM-L6-v2", input="Hello world")
    assert len(embedded.data[0].embedding) == 384


def test_openai_client_without_or_with_a_wrong_key_gets_401(server, caplog):
    with caplog.at_level(logging.WARNING, logger="server.auth"):
        with pytest.raises(openai.AuthenticationError) as info:
            server.openai(api_key=WRONG_KEY).chat.completions.create(
                model="base", messages=CHAT, max_tokens=2
            )
    assert info.value.status_code == 401
    assert info.value.code == "invalid_api_key"
    assert "unknown API key" in caplog.text
    assert WRONG_KEY not in caplog.text  # keys are never logged
    with pytest.raises(openai.AuthenticationError):
        server.openai(api_key=WRONG_KEY).models.list()

    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "base", "messages": CHAT})
    error = assert_error(r, 401, "missing_api_key")
    assert error["type"] == "authentication_error"
    assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Basic {INFER_KEY}"})
    assert_error(r, 401, "missing_api_key")  # only the Bearer scheme carries a key


def test_inference_key_on_an_admin_route_is_403(server, caplog):
    with caplog.at_level(logging.WARNING, logger="server.auth"):
        r = httpx.get(f"{server.url}/adapters", headers=bearer(INFER_KEY))
    error = assert_error(r, 403, "insufficient_scope")
    assert error["type"] == "permission_error"
    assert 'scope="admin"' in r.headers["www-authenticate"]
    assert "key app lacks scope admin" in caplog.text  # the key's name, not the key
    assert INFER_KEY not in caplog.text


# --- every mounted route declares a scope, and it is enforced -----------------------------


def test_every_route_declares_a_scope(server):
    scoped, undeclared = routes_by_scope(server.app)
    assert undeclared == [], f"routes without a scope (mount them with require_scope): {undeclared}"
    declared = {path: scope for _, path, scope in scoped}
    for path, scope in EXPECTED.items():
        assert declared.get(path) == scope, f"{path}: expected {scope}, got {declared.get(path)}"


def test_a_router_mounted_without_a_scope_is_caught(server):
    app = FastAPI()
    app.include_router(server.app.router)
    forgotten = APIRouter()

    @forgotten.post("/train/sft")
    async def train() -> dict[str, str]:
        return {}

    app.include_router(forgotten)
    _, undeclared = routes_by_scope(app)
    assert undeclared == ["['POST'] /train/sft scopes=frozenset()"]


def test_every_route_enforces_its_scope(server):
    scoped, _ = routes_by_scope(server.app)
    wrong = []
    for method, path, scope in scoped:
        if scope == PUBLIC:
            r = call(server, method, path, None)
            if r.status_code in (401, 403):
                wrong.append(f"{method} {path}: public but {r.status_code} without a key")
            continue
        r = call(server, method, path, None)
        if r.status_code != 401 or r.json()["error"]["code"] != "missing_api_key":
            wrong.append(f"{method} {path}: no key -> {r.status_code}, expected 401")
        r = call(server, method, path, WRONG_KEY)
        if r.status_code != 401:
            wrong.append(f"{method} {path}: wrong key -> {r.status_code}, expected 401")
        r = call(server, method, path, INFER_KEY)
        if scope == ADMIN and r.status_code != 403:
            wrong.append(f"{method} {path}: inference key -> {r.status_code}, expected 403")
        if scope == INFERENCE and r.status_code in (401, 403):
            wrong.append(f"{method} {path}: inference key refused with {r.status_code}")
        r = call(server, method, path, ADMIN_KEY)  # admin implies inference
        if r.status_code in (401, 403):
            wrong.append(f"{method} {path}: admin key refused with {r.status_code}")
    assert wrong == []
    assert {scope for _, _, scope in scoped} == {PUBLIC, INFERENCE, ADMIN}


def test_metrics_need_admin_and_probes_stay_open(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/ready").json()["status"] == "ready"
    assert_error(httpx.get(f"{server.url}/metrics"), 401, "missing_api_key")
    r = httpx.get(f"{server.url}/metrics", headers=bearer(ADMIN_KEY))
    assert r.status_code == 200 and "swapserve_requests_total" in r.text


# --- allow-lists ---------------------------------------------------------------------------


def test_allow_list_limits_models_and_hides_the_rest(server):
    client = server.openai(api_key=server.limited_key)
    # the base and the embedder serve every key; adapters only those on its list
    assert [m.id for m in client.models.list().data] == ["base", "all-MiniLM-L6-v2", "a"]
    r = client.completions.create(model="a", prompt="Hello", max_tokens=2)
    assert r.model == "a"
    assert client.completions.create(model="base", prompt="Hello", max_tokens=2).model == "base"
    with pytest.raises(openai.NotFoundError) as hidden:
        client.completions.create(model="b", prompt="Hello", max_tokens=2)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="zzz", prompt="Hello", max_tokens=2)
    # an adapter outside the allow-list looks exactly like one that does not exist
    assert hidden.value.body["code"] == unknown.value.body["code"] == "model_not_found"
    assert hidden.value.body["message"] == unknown.value.body["message"].replace("zzz", "b")
    # the same adapter for a key without an allow-list
    other = server.openai(api_key=INFER_KEY).completions.create(
        model="b", prompt="Hi", max_tokens=2
    )
    assert other.model == "b"


def test_collection_allow_list_hides_other_collections(server):
    for name in ("mine", "other"):
        r = httpx.post(
            f"{server.url}/rag/collections",
            json={"name": name},
            headers=bearer(ADMIN_KEY),
            timeout=120,
        )
        assert r.status_code == 201, r.text
    key = server.tenant_b_key
    # listing collections is an admin call; an inference key only searches its own
    listed = httpx.get(f"{server.url}/rag/collections", headers=bearer(key))
    assert_error(listed, 403, "insufficient_scope")
    r = call(server, "POST", "/rag/collections/other/search", key)
    assert_error(r, 404, "collection_not_found")
    with pytest.raises(openai.NotFoundError) as hidden:
        server.openai(api_key=key).chat.completions.create(
            model="base",
            messages=CHAT,
            max_tokens=2,
            extra_body={"rag": {"collection": "other"}},
        )
    assert hidden.value.body["param"] == "rag.collection"


# --- limits --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited_server(tiny_model_path, tmp_path_factory):
    server = start_live_server(
        base_model=str(tiny_model_path),
        quantization="none",
        max_model_len=256,
        default_max_tokens=8,
        data_dir=tmp_path_factory.mktemp("limits-data"),
        api_keys=f"{INFER_KEY}:inference,{ADMIN_KEY}:admin",
        rate_limit_rpm=5,
        max_streams_per_key=1,
    )
    yield server
    server.stop()


def test_rate_limit_is_429_with_retry_after(limited_server):
    statuses = [
        httpx.get(f"{limited_server.url}/v1/models", headers=bearer(INFER_KEY)).status_code
        for _ in range(6)
    ]
    assert statuses == [200] * 5 + [429]
    r = httpx.get(f"{limited_server.url}/v1/models", headers=bearer(INFER_KEY))
    assert_error(r, 429, "rate_limit_exceeded")
    assert int(r.headers["retry-after"]) >= 1
    with pytest.raises(openai.RateLimitError):
        limited_server.openai(api_key=INFER_KEY).models.list()
    # the bucket is the key's: another key still gets through, and probes are never limited
    r = httpx.get(f"{limited_server.url}/v1/models", headers=bearer(ADMIN_KEY))
    assert r.status_code == 200
    assert httpx.get(f"{limited_server.url}/health").status_code == 200


def test_concurrent_streams_per_key_are_limited(limited_server):
    engine = limited_server.app.state.engine
    limits = limited_server.app.state.auth.limits
    limits.buckets.clear()  # a fresh minute: this test is about streams
    real_decode = engine.runner.decode

    def slow_decode(*args, **kwargs):  # keep the first stream open while we knock again
        time.sleep(0.05)
        return real_decode(*args, **kwargs)

    engine.runner.decode = slow_decode
    payload = {"model": "base", "messages": CHAT, "max_tokens": 60, "stream": True}
    try:
        with httpx.stream(
            "POST",
            f"{limited_server.url}/v1/chat/completions",
            json={**payload, "ignore_eos": True},
            headers=bearer(ADMIN_KEY),
            timeout=30,
        ) as first:
            lines = first.iter_lines()  # held open: closing it would hang up on the server
            next(lines)
            assert limits.streams == {"env-2": 1}
            second = httpx.post(
                f"{limited_server.url}/v1/chat/completions",
                json=payload,
                headers=bearer(ADMIN_KEY),
                timeout=30,
            )
            assert_error(second, 429, "too_many_streams")
            assert second.headers["retry-after"] == "1"
            # a non-streamed request by the same key, and a stream by another key, pass
            plain = httpx.post(
                f"{limited_server.url}/v1/chat/completions",
                json={**payload, "stream": False, "max_tokens": 2},
                headers=bearer(ADMIN_KEY),
                timeout=30,
            )
            assert plain.status_code == 200, plain.text
            client = limited_server.openai(api_key=INFER_KEY)
            chunks = list(
                client.chat.completions.create(
                    model="base", messages=CHAT, max_tokens=2, stream=True
                )
            )
            assert chunks
            lines.close()
        deadline = time.monotonic() + 10
        while limits.streams and time.monotonic() < deadline:
            time.sleep(0.05)
        assert limits.streams == {}  # slots are given back when streams end
    finally:
        engine.runner.decode = real_decode
