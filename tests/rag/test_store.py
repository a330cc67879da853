from __future__ import annotations

import json

import pytest

from rag.collection import DocumentInput
from rag.errors import (
    CollectionExists,
    CollectionNotFound,
    DocumentTooLarge,
    EmbedderMismatch,
    InvalidArgument,
    InvalidDocument,
    InvalidName,
    RAGError,
)
from rag.store import CollectionStore, documents_from_bytes
from tests.rag.fake_embedder import FakeEmbedder


@pytest.fixture
def store(tmp_path, fake_embedder):
    s = CollectionStore(tmp_path / "rag", fake_embedder, max_doc_bytes=1000)
    yield s
    s.close()


def test_create_list_get_delete(store, tmp_path, fake_embedder):
    store.create("docs")
    store.create("other.v2")
    assert [i.name for i in store.list()] == ["docs", "other.v2"]
    with pytest.raises(CollectionExists) as e:
        store.create("docs")
    assert e.value.status == 409
    store.add_documents("docs", [DocumentInput("a", "alpha beta")])
    # A second store over the same folder (another process) sees the data.
    other = CollectionStore(tmp_path / "rag", fake_embedder)
    assert other.get("docs").search("alpha")[0].doc_id == "a"
    other.close()
    store.delete("docs")
    assert [i.name for i in store.list()] == ["other.v2"]
    for op in (store.get, store.delete):
        with pytest.raises(CollectionNotFound) as e:
            op("docs")
        assert e.value.status == 404


@pytest.mark.parametrize("name", ["", "-x", ".hidden", "a/b", "../up", "x" * 65, "sp ace", "é"])
def test_unsafe_names_refused(store, name):
    with pytest.raises(InvalidName) as e:
        store.create(name)
    assert e.value.status == 400
    with pytest.raises(InvalidName):
        store.get(name)


def test_store_with_another_embedder_refuses_collection(store, tmp_path):
    store.create("docs")
    other = CollectionStore(tmp_path / "rag", FakeEmbedder(dim=32))
    with pytest.raises(EmbedderMismatch):
        other.get("docs")
    # Listing reads metadata only, so it works whatever the embedder.
    assert [i.embedder_name for i in other.list()] == ["fake-bow-64"]


def test_ingest_files_of_every_format(store, tmp_path):
    store.create("docs")
    files = {
        "a.json": json.dumps(
            [{"id": "j1", "text": "json one", "metadata": {"lang": "en"}}, {"text": "json two"}]
        ),
        "b.jsonl": '{"id": "l1", "text": "line one"}\n\n{"text": "line two", "metadata": {}}\n',
        "c.txt": "plain text file",
        "d.md": "# Title\n\nmarkdown body",
    }
    paths = []
    for name, content in files.items():
        (tmp_path / name).write_text(content)
        paths.append(tmp_path / name)
    seen = []
    res = store.ingest_files("docs", paths, progress=lambda d, t: seen.append((d, t)))
    assert sorted(res.added) == sorted(["j1", "a.json#1", "l1", "b.jsonl#3", "c.txt", "d.md"])
    assert seen[-1] == (6, 6)
    hits = store.search("docs", "json", top_k=10, filter={"lang": "en"})
    assert [(h.doc_id, h.metadata) for h in hits] == [("j1", {"source": "a.json", "lang": "en"})]
    assert store.search("docs", "x", top_k=10, filter={"source": "d.md"})[0].doc_id == "d.md"


def test_ingest_records(store):
    store.create("docs")
    res = store.ingest_records("docs", [{"id": "r", "text": "record text", "metadata": {"n": 1}}])
    assert res.added == ["r"]
    with pytest.raises(InvalidDocument, match="unknown field"):
        store.ingest_records("docs", [{"text": "x", "body": "y"}])
    with pytest.raises(InvalidDocument, match="no documents"):
        store.ingest_records("docs", [])


@pytest.mark.parametrize(
    ("data", "filename", "error", "status", "match"),
    [
        (b"", "e.txt", InvalidDocument, 422, "empty"),
        (b"  \n ", "e.md", InvalidDocument, 422, "empty"),
        (b"caf\xe9 latin-1", "l.txt", InvalidDocument, 422, "UTF-8"),
        (b"x" * 1001, "big.txt", DocumentTooLarge, 413, "1001 bytes"),
        (b'[{"text": ""}]', "e.json", InvalidDocument, 422, "empty"),
        (b"[]", "e.json", InvalidDocument, 422, "no documents"),
        (b'{"text": "x"}', "o.json", InvalidDocument, 422, "JSON list"),
        (b"[{]", "bad.json", InvalidDocument, 422, "invalid JSON"),
        (b'{"text": "ok"}\nnot json\n', "bad.jsonl", InvalidDocument, 422, "line 2"),
        (b'[{"text": "x", "metadata": [1]}]', "m.json", InvalidDocument, 422, "metadata"),
        (b"data", "file.pdf", InvalidDocument, 422, "unknown format"),
    ],
)
def test_bad_input(store, data, filename, error, status, match):
    store.create("docs")
    with pytest.raises(error, match=match) as e:
        store.ingest_bytes("docs", data, filename)
    assert e.value.status == status and isinstance(e.value, RAGError)
    assert store.get("docs").count_chunks() == 0


def test_size_limit_default_is_2_mib(tmp_path, fake_embedder):
    big = b"word " * (2 * 1024 * 1024 // 5 + 1)
    with pytest.raises(DocumentTooLarge):
        documents_from_bytes(big, "big.txt")
    assert len(documents_from_bytes(big[:-10], "ok.txt")) == 1


def test_bom_is_tolerated():
    (doc,) = documents_from_bytes("\ufeffhello".encode(), "b.txt")
    assert doc.text == "hello"


def test_top_k_out_of_range(store):
    store.create("docs")
    store.add_documents("docs", [DocumentInput("a", "alpha")])
    for k in (0, 101):
        with pytest.raises(InvalidArgument, match="between 1 and 100") as e:
            store.search("docs", "alpha", top_k=k)
        assert e.value.status == 400
    assert len(store.search("docs", "alpha", top_k=100)) == 1
