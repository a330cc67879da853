"""The /rag routes and the `rag` extension of chat/completions, on the tiny model with the
REAL default embedder (all-MiniLM-L6-v2), through the real server and the `openai` SDK."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from rag.prompt import augment_messages, build_prompt
from tests.support import LiveServer, start_live_server
from tests.tiny_model import build_lora_adapter

MAX_DOC_BYTES = 4096
UPLOAD_LIMIT = 256 * 1024

MAX_DOCS = 5
NOTES = {
    "zorblax.md": "# Zorblax-7\n\nThe Zorblax-7 reactor runs on frozen lemonade.",
    "quibble.md": "# Quibble\n\nQuibble birds migrate to the moon every leap year.",
}
DOCS = [
    {"id": "glorp", "text": "Glorpian ferns bloom only under purple rain.", "metadata": {"topic": "plants", "year": 2021}},
    {"id": "trandle", "text": "Trandle engines are powered by compressed laughter.", "metadata": {"topic": "engines", "year": 2022}},
    {"id": "mizzle", "text": "Mizzle cheese is aged inside hollow volcanoes.", "metadata": {"topic": "food", "year": 2022}},
]  # fmt: skip


@pytest.fixture(scope="session")
def embedder():
    """The default embedder, loaded once per session: the in-process servers reuse it
    through rag.embeddings.get_embedder's process-wide cache."""
    from rag.embeddings import get_embedder

    return get_embedder()


@pytest.fixture(scope="module")
def server(tiny_model_path, tmp_path_factory, embedder) -> Iterator[LiveServer]:
    data = tmp_path_factory.mktemp("rag-data")
    server = start_live_server(
        base_model=str(tiny_model_path),
        quantization="none",
        max_model_len=512,
        default_max_tokens=8,
        max_body_bytes=64 * 1024,
        rag_max_doc_bytes=MAX_DOC_BYTES,
        rag_max_upload_bytes=UPLOAD_LIMIT,
        rag_max_docs_per_request=MAX_DOCS,
        data_dir=data,
    )
    server.data_dir = data
    yield server
    server.stop()


def api(server: LiveServer, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, f"{server.url}/rag{path}", timeout=120, **kwargs)


def assert_error(r: httpx.Response, status: int, param: str | None = None, code=None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def doc_count(server: LiveServer, name: str) -> int:
    return api(server, "GET", f"/collections/{name}").json()["documents"]


@pytest.fixture(scope="module")
def kb(server) -> str:
    """A collection with three JSON documents (with metadata) and two Markdown notes."""
    assert api(server, "POST", "/collections", json={"name": "kb"}).status_code == 201
    r = api(server, "POST", "/collections/kb/documents", json={"documents": DOCS})
    assert r.status_code == 200, r.text
    files = [("files", (n, t.encode(), "text/markdown")) for n, t in NOTES.items()]
    r = api(
        server,
        "POST",
        "/collections/kb/documents",
        files=files,
        data={"metadata": '{"kind": "note"}'},
    )
    assert r.status_code == 200, r.text
    return "kb"


def citations_of(obj) -> list[dict]:
    # The openai SDK keeps fields it does not know in model_extra.
    return obj.model_extra["citations"]


# --- collections ----------------------------------------------------------------------------


def test_collection_crud(server):
    r = api(server, "POST", "/collections", json={"name": "crud"})
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["id"] == "crud" and info["object"] == "rag.collection"
    assert info["documents"] == 0 and info["chunks"] == 0
    assert info["embedder"].startswith("all-MiniLM-L6-v2@") and info["dim"] == 384

    assert "crud" in [c["id"] for c in api(server, "GET", "/collections").json()["data"]]
    assert api(server, "GET", "/collections/crud").json()["documents"] == 0

    assert_error(
        api(server, "POST", "/collections", json={"name": "crud"}), 409, "name", "collection_exists"
    )
    for bad in ("has space", "../up", "-dash", "x" * 65, ""):
        assert_error(api(server, "POST", "/collections", json={"name": bad}), 400, "name")

    r = api(server, "DELETE", "/collections/crud")
    assert r.status_code == 200 and r.json() == {
        "id": "crud",
        "object": "rag.collection",
        "deleted": True,
    }
    assert_error(api(server, "GET", "/collections/crud"), 404, "name", "collection_not_found")
    assert_error(api(server, "DELETE", "/collections/crud"), 404, "name")
    assert "crud" not in [c["id"] for c in api(server, "GET", "/collections").json()["data"]]


def test_bad_chunking_is_refused_and_creates_nothing(server):
    r = api(server, "POST", "/collections", json={"name": "chunky", "chunk_tokens": 4})
    assert_error(r, 400, "chunk_tokens")
    assert_error(api(server, "GET", "/collections/chunky"), 404)


def test_unknown_collection_is_404_on_every_route(server):
    for method, path, kwargs in [
        ("GET", "/collections/nope", {}),
        ("DELETE", "/collections/nope", {}),
        ("POST", "/collections/nope/documents", {"json": {"documents": DOCS}}),
        ("GET", "/collections/nope/documents", {}),
        ("DELETE", "/collections/nope/documents/x", {}),
        ("POST", "/collections/nope/search", {"json": {"query": "q"}}),
    ]:
        assert_error(api(server, method, path, **kwargs), 404, "name", "collection_not_found")


# --- ingest and search ------------------------------------------------------------------------


def test_ingest_json_and_markdown_then_search(server, kb):
    info = api(server, "GET", f"/collections/{kb}").json()
    assert info["documents"] == 5 and info["chunks"] >= 5
    docs = {d["id"]: d for d in api(server, "GET", f"/collections/{kb}/documents").json()["data"]}
    assert docs["zorblax.md"]["metadata"] == {"source": "zorblax.md", "kind": "note"}
    assert docs["glorp"]["metadata"]["topic"] == "plants"

    r = api(
        server,
        "POST",
        f"/collections/{kb}/search",
        json={"query": "What fuel does the Zorblax-7 reactor use?", "top_k": 2},
    )
    assert r.status_code == 200, r.text
    hits = r.json()["data"]
    assert len(hits) == 2
    top = hits[0]
    assert top["doc_id"] == "zorblax.md" and "frozen lemonade" in top["text"]
    assert top["chunk_index"] == 0 and top["metadata"]["kind"] == "note"
    assert hits[0]["score"] >= hits[1]["score"]


def test_reingest_is_unchanged_and_ids_default_to_a_text_hash(server):
    api(server, "POST", "/collections", json={"name": "hashes"})
    body = {"documents": [{"text": "Plonk stones hum at dawn."}, {"text": "Snerd pies are blue."}]}
    first = api(server, "POST", "/collections/hashes/documents", json=body).json()
    assert first["added"] == 2 and first["chunks"] == 2 and first["documents"] == 2
    assert all(i.startswith("sha256:") for i in first["ids"])
    again = api(server, "POST", "/collections/hashes/documents", json=body).json()
    assert again["ids"] == first["ids"]
    assert (again["added"], again["unchanged"], again["chunks"]) == (0, 2, 0)
    edit = {"documents": [{"id": first["ids"][0], "text": "Plonk stones hum at dusk."}]}
    r = api(server, "POST", "/collections/hashes/documents", json=edit).json()
    assert (r["replaced"], r["documents"]) == (1, 2)


def test_search_filter_top_k_and_min_score(server, kb):
    def search(**body):
        return api(
            server,
            "POST",
            f"/collections/{kb}/search",
            json={"query": "engines powered by laughter", **body},
        )

    hits = search(top_k=10, filter={"year": 2022}).json()["data"]
    assert {h["doc_id"] for h in hits} == {"trandle", "mizzle"}
    hits = search(top_k=10, filter={"topic": {"$in": ["plants", "food"]}}).json()["data"]
    assert {h["doc_id"] for h in hits} == {"glorp", "mizzle"}
    assert search(top_k=100).json()["data"][0]["doc_id"] == "trandle"
    assert search(min_score=0.99).json()["data"] == []

    assert_error(search(filter={"colour": "red"}), 422, "filter", "unknown_filter_field")
    assert_error(search(filter={"topic": {"$gt": 1}}), 400, "filter", "invalid_filter")
    assert_error(search(top_k=0), 400, "top_k")
    assert_error(search(top_k=101), 400, "top_k")
    assert_error(search(min_score=2), 400, "min_score")
    assert_error(api(server, "POST", f"/collections/{kb}/search", json={"query": ""}), 400, "query")


def test_delete_document(server):
    api(server, "POST", "/collections", json={"name": "deletions"})
    api(server, "POST", "/collections/deletions/documents", json={"documents": DOCS})
    r = api(server, "DELETE", "/collections/deletions/documents/trandle")
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert doc_count(server, "deletions") == 2
    hits = api(
        server,
        "POST",
        "/collections/deletions/search",
        json={"query": "compressed laughter", "top_k": 5},
    ).json()["data"]
    assert "trandle" not in {h["doc_id"] for h in hits}
    assert_error(
        api(server, "DELETE", "/collections/deletions/documents/trandle"),
        404,
        "doc_id",
        "document_not_found",
    )


# --- refused input changes nothing ----------------------------------------------------------


def md(name: str, data: bytes):
    return ("files", (name, data, "text/markdown"))


REFUSED = {
    # the schema says text is not blank: a 400 naming the document (a blank *file* is a 422)
    "empty text": ({"json": {"documents": [DOCS[0], {"id": "e", "text": ""}]}}, 400, "documents.1.text"),
    "blank text": ({"json": {"documents": [{"id": "b", "text": "  \n "}]}}, 400, "documents.0.text"),
    "no documents": ({"json": {"documents": []}}, 400, "documents"),
    "missing text": ({"json": {"documents": [{"id": "x"}]}}, 400, "documents.0.text"),
    "unknown field": ({"json": {"documents": [{"text": "hi", "body": "x"}]}}, 400, "documents.0.body"),
    "bad metadata": ({"json": {"documents": [{"text": "hi", "metadata": [1]}]}}, 400, "documents.0.metadata"),
    "duplicate ids": ({"json": {"documents": [DOCS[0], DOCS[0]]}}, 422, "id"),
    "over the document limit": ({"json": {"documents": [DOCS[1], {"text": "a" * (MAX_DOC_BYTES + 1)}]}}, 413, "text"),
    "not UTF-8": ({"files": [md("good.md", b"Good note."), md("latin1.md", "caf\xe9 cr\xe8me".encode("latin-1"))]}, 422, "file"),
    "empty file": ({"files": [md("empty.md", b"")]}, 422, "text"),
    "unknown file type": ({"files": [("files", ("notes.pdf", b"%PDF-1.4", "application/pdf"))]}, 422, "format"),
    "bad jsonl": ({"files": [("files", ("d.jsonl", b'{"text": "ok"}\nnot json\n', "application/jsonl"))]}, 422, None),
    "bad form metadata": ({"files": [md("ok.md", b"Fine.")], "data": {"metadata": "[1"}}, 400, "metadata"),
    "no files": ({"files": {"metadata": (None, "{}")}}, 400, "files"),  # a form field only
    "too many documents": ({"json": {"documents": [{"id": f"n{i}", "text": f"Note {i}."} for i in range(MAX_DOCS + 1)]}}, 413, "documents"),
    "too many files": ({"files": [md(f"n{i}.md", b"A note.") for i in range(MAX_DOCS + 1)]}, 413, "documents"),
    "over the body limit": ({"files": [md("big.md", b"a " * UPLOAD_LIMIT)]}, 413, None),
}  # fmt: skip


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_refused_ingest_changes_nothing(server, case):
    if not api(server, "GET", "/collections/guarded").is_success:
        api(server, "POST", "/collections", json={"name": "guarded"})
        api(server, "POST", "/collections/guarded/documents", json={"documents": DOCS[:1]})
    before = api(server, "GET", "/collections/guarded").json()
    kwargs, status, param = REFUSED[case]
    r = api(server, "POST", "/collections/guarded/documents", **kwargs)
    assert_error(r, status, param)
    after = api(server, "GET", "/collections/guarded").json()
    assert (after["documents"], after["chunks"]) == (before["documents"], before["chunks"])


def test_unsupported_content_type(server, kb):
    r = api(
        server,
        "POST",
        f"/collections/{kb}/documents",
        content=b"hello",
        headers={"content-type": "text/plain"},
    )
    assert_error(r, 415, code="unsupported_media_type")


# --- chat and completions with `rag` --------------------------------------------------------

QUESTION = [{"role": "user", "content": "What does the Zorblax-7 reactor run on?"}]


def expected_chat_prompt_tokens(server, messages, collection, top_k) -> int:
    """Prompt length when the retrieved passages are really in the prompt: the same
    passages, injected by rag.prompt, rendered and tokenized by the server's engine."""
    rag = server.app.state.rag
    hits = rag.store.search(collection, messages[-1]["content"], top_k=top_k)
    engine = server.app.state.engine
    return len(engine.tokenize(engine.render_chat(augment_messages(messages, hits))))


def test_chat_with_rag_puts_passages_in_the_prompt_and_cites_them(server, kb):
    client = server.openai()
    plain = client.chat.completions.create(model="base", messages=QUESTION, max_tokens=4)
    assert plain.model_extra.get("citations") is None
    r = client.chat.completions.create(
        model="base",
        messages=QUESTION,
        max_tokens=4,
        extra_body={"rag": {"collection": kb, "top_k": 2}},
    )
    cites = citations_of(r)
    assert [c["index"] for c in cites] == [1, 2]
    assert cites[0]["doc_id"] == "zorblax.md" and cites[0]["chunk_index"] == 0
    assert "frozen lemonade" in cites[0]["snippet"] and 0 < cites[0]["score"] <= 1
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 20
    assert r.usage.prompt_tokens == expected_chat_prompt_tokens(server, QUESTION, kb, 2)


def test_chat_with_rag_streamed_carries_citations_on_the_first_chunk(server, kb):
    client = server.openai()
    kwargs = dict(
        model="base",
        messages=QUESTION,
        max_tokens=6,
        temperature=0,
        extra_body={"rag": {"collection": kb, "top_k": 1}, "ignore_eos": True},
    )
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    first = chunks[0]
    assert first.choices[0].delta.role == "assistant"
    assert citations_of(first) == citations_of(whole)
    assert all("citations" not in (c.model_extra or {}) for c in chunks[1:])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_raw_sse_first_event_has_citations(server, kb):
    body = {
        "model": "base",
        "messages": QUESTION,
        "max_tokens": 2,
        "stream": True,
        "rag": {"collection": kb, "top_k": 1},
    }
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    first = json.loads(events[0])
    assert first["object"] == "chat.completion.chunk"
    assert first["citations"][0]["doc_id"] == "zorblax.md"
    assert events[-1] == "[DONE]"


def test_rag_filter_and_min_score_in_chat(server, kb):
    client = server.openai()
    r = client.chat.completions.create(
        model="base",
        messages=QUESTION,
        max_tokens=2,
        extra_body={"rag": {"collection": kb, "top_k": 5, "filter": {"topic": "food"}}},
    )
    assert [c["doc_id"] for c in citations_of(r)] == ["mizzle"]
    plain = client.chat.completions.create(model="base", messages=QUESTION, max_tokens=2)
    none = client.chat.completions.create(
        model="base",
        messages=QUESTION,
        max_tokens=2,
        extra_body={"rag": {"collection": kb, "min_score": 0.999}},
    )
    # Nothing passed the threshold: no citations, and the prompt is the caller's own.
    assert citations_of(none) == []
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens


def test_completions_with_rag(server, kb):
    client = server.openai()
    prompt = "The Zorblax-7 reactor runs on"
    r = client.completions.create(
        model="base",
        prompt=prompt,
        max_tokens=3,
        extra_body={"rag": {"collection": kb, "top_k": 1}},
    )
    assert citations_of(r)[0]["doc_id"] == "zorblax.md"
    hits = server.app.state.rag.store.search(kb, prompt, top_k=1)
    engine = server.app.state.engine
    assert r.usage.prompt_tokens == len(engine.tokenize(build_prompt(prompt, hits)))

    chunks = list(
        client.completions.create(
            model="base",
            prompt=prompt,
            max_tokens=3,
            stream=True,
            extra_body={"rag": {"collection": kb, "top_k": 1}},
        )
    )
    assert citations_of(chunks[0]) == citations_of(r)
    assert chunks[0].choices[0].text == ""

    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(
            model="base", prompt=["a", "b"], max_tokens=1, extra_body={"rag": {"collection": kb}}
        )
    assert e.value.body["param"] == "prompt"


@pytest.mark.parametrize(
    "rag, status, param",
    [
        ({"collection": "nope"}, 404, "rag.collection"),
        ({"collection": "no such name!"}, 400, "rag.collection"),
        ({"collection": "kb", "top_k": 0}, 400, "rag.top_k"),
        ({"collection": "kb", "top_k": 101}, 400, "rag.top_k"),
        ({"collection": "kb", "min_score": -3}, 400, "rag.min_score"),
        ({"collection": "kb", "topk": 3}, 400, "rag.topk"),
        ({"top_k": 3}, 400, "rag.collection"),
        ({"collection": "kb", "filter": {"colour": "red"}}, 422, "rag.filter"),
        ({"collection": "kb", "filter": {"topic": {"$regex": "x"}}}, 400, "rag.filter"),
        ("kb", 400, "rag"),
    ],
)
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_bad_rag_in_generation_requests(server, kb, rag, status, param, endpoint):
    if endpoint == "chat":
        path, body = "chat/completions", {"messages": QUESTION}
    else:
        path, body = "completions", {"prompt": "The Zorblax-7 reactor"}
    r = httpx.post(
        f"{server.url}/v1/{path}",
        json={"model": "base", "max_tokens": 1, "rag": rag, **body},
        timeout=60,
    )
    assert_error(r, status, param)


def test_context_overflow_from_passages_says_so(server, kb):
    body = {
        "model": "base",
        "messages": QUESTION,
        "max_tokens": 500,
        "rag": {"collection": kb, "top_k": 5},
    }
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    err = assert_error(r, 400, code="context_length_exceeded")
    assert "lower rag.top_k" in err["message"]


def test_rag_errors_through_the_sdk(server, kb):
    client = server.openai()
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(
            model="base", messages=QUESTION, extra_body={"rag": {"collection": "nope"}}
        )
    assert e.value.body["param"] == "rag.collection"
    with pytest.raises(openai.NotFoundError) as e:  # the model is checked before retrieval
        client.chat.completions.create(
            model="nope", messages=QUESTION, extra_body={"rag": {"collection": kb}}
        )
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="base",
            messages=[{"role": "system", "content": "Be brief."}],
            extra_body={"rag": {"collection": kb}},
        )
    assert e.value.body["param"] == "messages"


def test_rag_with_an_adapter(server, kb, tiny_model_path, tmp_path):
    """`model` picks the behaviour, `rag` the knowledge: an adapter gets the same passages."""
    path = build_lora_adapter(tiny_model_path, tmp_path / "tone")
    r = httpx.post(f"{server.url}/adapters", json={"name": "tone", "path": str(path)}, timeout=60)
    assert r.status_code == 201, r.text
    client = server.openai()
    kwargs = dict(
        messages=QUESTION,
        max_tokens=6,
        temperature=0,
        extra_body={"rag": {"collection": kb, "top_k": 2}, "ignore_eos": True},
    )
    base = client.chat.completions.create(model="base", **kwargs)
    tuned = client.chat.completions.create(model="tone", **kwargs)
    assert tuned.model == "tone"
    assert citations_of(tuned) == citations_of(base)
    assert tuned.usage.prompt_tokens == base.usage.prompt_tokens
    assert tuned.choices[0].message.content != base.choices[0].message.content


# --- CLI, settings, OpenAPI -------------------------------------------------------------------


def test_cli_ingest_lands_where_the_server_reads(server, tmp_path, capsys):
    from server.cli import main

    note = tmp_path / "blimp.md"
    note.write_text("Blimp towers are built from recycled thunder.")
    data = str(server.data_dir)
    assert main(["rag", "ingest", "clinotes", str(note), "--create", "--data-dir", data]) == 0
    assert "1 added" in capsys.readouterr().out
    assert doc_count(server, "clinotes") == 1
    r = api(server, "POST", "/collections/clinotes/search", json={"query": "recycled thunder"})
    assert r.json()["data"][0]["doc_id"] == "blimp.md"
    # A RAG error is exit code 1 with a message, not a traceback.
    assert main(["rag", "search", "nope", "q", "--data-dir", data]) == 1
    assert "no collection" in capsys.readouterr().err


def test_embedder_loads_on_first_use_not_at_start(tmp_path, embedder):
    from server.retrieval import RetrievalService

    rag = RetrievalService(tmp_path, max_doc_bytes=1024, approx_threshold=100)
    assert rag.store.list() == []
    assert not rag.embedder.loaded
    rag.store.create("c")
    assert rag.embedder.loaded
    rag.close()


def test_bad_embedder_folder_is_503_not_a_crash(tmp_path):
    from server.errors import APIError
    from server.retrieval import LazyEmbedder

    lazy = LazyEmbedder(tmp_path / "missing")
    with pytest.raises(APIError) as e:
        lazy.dim  # noqa: B018
    assert e.value.status == 503 and e.value.code == "embedder_unavailable"


def test_upload_limit_must_exceed_document_limit():
    from pydantic import ValidationError

    from server.config import Settings

    with pytest.raises(ValidationError, match="SWAPSERVE_RAG_MAX_UPLOAD_BYTES"):
        Settings(rag_max_doc_bytes=4096, rag_max_upload_bytes=4096)


def test_openapi_documents_every_rag_route(server):
    spec = httpx.get(f"{server.url}/openapi.json").json()
    routes = {
        (p, m): op
        for p, ops in spec["paths"].items()
        if p.startswith("/rag")
        for m, op in ops.items()
    }
    assert len(routes) == 8
    for (path, method), op in routes.items():
        assert op["tags"] == ["rag"]
        ok = op["responses"].get("200") or op["responses"].get("201")
        assert "$ref" in json.dumps(ok), (path, method)
    body = routes[("/rag/collections/{name}/documents", "post")]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert "RAGOptions" in spec["components"]["schemas"]


def test_data_survives_a_restart(tiny_model_path, tmp_path, embedder):
    """Stop the server (its port closes, its store is closed), start a new one on the same
    data dir: the collections, their documents and the answers to every query are the same."""
    kwargs = dict(
        base_model=str(tiny_model_path),
        quantization="none",
        max_model_len=512,
        default_max_tokens=4,
        data_dir=tmp_path,
    )
    queries = ["purple rain", "What does the Zorblax-7 reactor run on?", "cheese", "moon birds"]

    def state(server: LiveServer) -> dict:
        out: dict = {"collections": api(server, "GET", "/collections").json()["data"]}
        for c in out["collections"]:
            name = c["id"]
            out[name] = {
                "info": api(server, "GET", f"/collections/{name}").json(),
                "documents": api(server, "GET", f"/collections/{name}/documents").json()["data"],
            }
        search = "/collections/durable/search"
        out["hits"] = [
            api(server, "POST", search, json={"query": q, "top_k": 10}).json()["data"]
            for q in queries
        ]
        out["filtered"] = api(
            server, "POST", search, json={"query": "engines", "filter": {"year": 2022}}
        ).json()["data"]
        return out

    def cited(server: LiveServer) -> list:
        r = server.openai().chat.completions.create(
            model="base",
            messages=QUESTION,
            max_tokens=2,
            extra_body={"rag": {"collection": "durable", "top_k": 3}},
        )
        return citations_of(r)

    first = start_live_server(**kwargs)
    try:
        # Everything through HTTP: create, JSON documents, Markdown uploads, a delete.
        assert api(first, "POST", "/collections", json={"name": "durable"}).status_code == 201
        assert api(first, "POST", "/collections", json={"name": "spare"}).status_code == 201
        r = api(first, "POST", "/collections/durable/documents", json={"documents": DOCS})
        assert r.status_code == 200, r.text
        files = [("files", (n, t.encode(), "text/markdown")) for n, t in NOTES.items()]
        r = api(first, "POST", "/collections/durable/documents", files=files)
        assert r.status_code == 200, r.text
        assert api(first, "DELETE", "/collections/durable/documents/mizzle").status_code == 200
        before = state(first)
        cited_before = cited(first)
    finally:
        first.stop()
    with pytest.raises(httpx.ConnectError):  # really stopped
        httpx.get(f"{first.url}/health", timeout=5)

    second = start_live_server(**kwargs)
    try:
        after = state(second)
        assert after == before
        assert [c["id"] for c in after["collections"]] == ["durable", "spare"]
        durable = after["durable"]
        assert durable["info"]["documents"] == 4
        assert {d["id"] for d in durable["documents"]} == {"glorp", "trandle", *NOTES}
        assert after["hits"][0][0]["doc_id"] == "glorp"
        assert after["hits"][1][0]["doc_id"] == "zorblax.md"
        assert len(after["hits"][2]) == 4  # every chunk of the 4 documents left
        assert "mizzle" not in {h["doc_id"] for hits in after["hits"] for h in hits}
        assert [h["doc_id"] for h in after["filtered"]] == ["trandle"]
        assert cited(second) == cited_before
        assert cited_before[0]["doc_id"] == "zorblax.md"
        # and the reopened collection takes writes
        r = api(second, "POST", "/collections/durable/documents", json={"documents": DOCS[2:]})
        assert r.status_code == 200 and r.json()["added"] == 1
    finally:
        second.stop()
