from __future__ import annotations

import numpy as np
import pytest

from rag.chunking import Chunk
from rag.collection import Collection, DocumentInput, IndexConfig
from rag.errors import (
    DocumentNotFound,
    EmbedderMismatch,
    InvalidArgument,
    InvalidDocument,
    InvalidFilter,
    UnknownFilterField,
)
from tests.rag.fake_embedder import FakeEmbedder

PETS = [
    DocumentInput("cats", "Cats purr and meow and chase mice.", {"kind": "pet", "legs": 4}),
    DocumentInput("dogs", "Dogs bark and fetch sticks in the park.", {"kind": "pet", "legs": 4}),
    DocumentInput("birds", "Birds sing and fly south in winter.", {"kind": "pet", "legs": 2}),
    DocumentInput("stocks", "Stock markets fell as bond yields rose.", {"kind": "finance"}),
]


@pytest.fixture
def coll(tmp_path, fake_embedder):
    c = Collection.create(tmp_path / "pets", fake_embedder)
    c.add_documents(PETS)
    yield c
    c.close()


def _consistent(c: Collection) -> None:
    assert c.index_size() == c.count_chunks()


def test_search_ranks_matching_document_first(coll):
    hits = coll.search("why do cats meow", top_k=2)
    assert [h.doc_id for h in hits][0] == "cats"
    h = hits[0]
    assert h.text == PETS[0].text and h.chunk_index == 0 and h.metadata["kind"] == "pet"
    assert hits[0].score >= hits[1].score


def test_min_score_and_top_k(coll):
    assert len(coll.search("cats", top_k=10)) == 4  # capped at what exists
    hits = coll.search("cats meow", top_k=4, min_score=0.3)
    assert [h.doc_id for h in hits] == ["cats"]
    for bad in (0, 101, -1, 2.5, True):
        with pytest.raises(InvalidArgument, match="top_k") as e:
            coll.search("cats", top_k=bad)
        assert e.value.status == 400
    with pytest.raises(InvalidArgument, match="min_score"):
        coll.search("cats", min_score=2.0)
    with pytest.raises(InvalidArgument, match="query"):
        coll.search("   ")


def test_prefilter_returns_top_k_even_far_from_query(tmp_path, fake_embedder):
    c = Collection.create(tmp_path / "c", fake_embedder)
    # 200 documents that match the query, 5 that don't but carry the filtered tag.
    docs = [DocumentInput(f"near{i}", f"apple banana cherry {i}", {"tag": "a"}) for i in range(200)]
    docs += [DocumentInput(f"far{i}", f"zebra quantum volcano {i}", {"tag": "b"}) for i in range(5)]
    c.add_documents(docs)
    hits = c.search("apple banana cherry", top_k=5, filter={"tag": "b"})
    # A post-filter over the 5 nearest would return nothing here.
    assert sorted(h.doc_id for h in hits) == [f"far{i}" for i in range(5)]
    hits = c.search("apple", top_k=3, filter={"tag": {"$in": ["b", "zzz"]}})
    assert len(hits) == 3 and all(h.doc_id.startswith("far") for h in hits)


def test_filter_semantics_and_errors(coll):
    assert {h.doc_id for h in coll.search("x", top_k=10, filter={"legs": 2})} == {"birds"}
    # Types are strict: "4" is not 4.
    assert coll.search("x", top_k=10, filter={"legs": "4"}) == []
    both = coll.search("x", top_k=10, filter={"kind": "pet", "legs": {"$in": [2, 4]}})
    assert {h.doc_id for h in both} == {"cats", "dogs", "birds"}
    with pytest.raises(UnknownFilterField, match="'colour'") as e:
        coll.search("x", filter={"colour": "red"})
    assert e.value.status == 422
    for bad in ({"kind": {"$gt": 1}}, {"kind": {"$in": []}}, {"kind": [1]}, "kind=pet"):
        with pytest.raises(InvalidFilter) as e:
            coll.search("x", filter=bad)
        assert e.value.status == 400


def test_delete_document(coll):
    assert coll.delete_document("cats") == 1
    assert all(h.doc_id != "cats" for h in coll.search("cats meow", top_k=10))
    _consistent(coll)
    with pytest.raises(DocumentNotFound) as e:
        coll.delete_document("cats")
    assert e.value.status == 404


def test_add_existing_id_replaces(coll):
    res = coll.add_documents([DocumentInput("cats", "Cats sleep all day long.", {"kind": "pet"})])
    assert res.replaced == ["cats"] and res.added == []
    texts = [h.text for h in coll.search("cats", top_k=10) if h.doc_id == "cats"]
    assert texts == ["Cats sleep all day long."]
    _consistent(coll)
    # Same text and metadata: nothing to do; same text, new metadata: metadata only.
    same = coll.add_documents([DocumentInput("cats", "Cats sleep all day long.", {"kind": "pet"})])
    assert same.unchanged == ["cats"] and same.chunks_written == 0
    meta = coll.add_documents([DocumentInput("cats", "Cats sleep all day long.", {"kind": "cat"})])
    assert meta.metadata_updated == ["cats"] and meta.chunks_written == 0
    assert [h.doc_id for h in coll.search("cats", filter={"kind": "cat"})] == ["cats"]


def test_bad_documents_change_nothing(coll):
    before = coll.count_chunks()
    with pytest.raises(InvalidDocument, match="twice"):
        coll.add_documents([DocumentInput("a", "x"), DocumentInput("a", "y")])
    with pytest.raises(InvalidDocument, match="empty"):
        coll.add_documents([DocumentInput("ok", "fine"), DocumentInput("b", "  ")])
    with pytest.raises(InvalidDocument, match="JSON"):
        coll.add_documents([DocumentInput("c", "x", {"f": float("nan")})])
    with pytest.raises(InvalidDocument, match="id"):
        coll.add_documents([DocumentInput("", "x")])
    assert coll.count_chunks() == before


def test_persists_across_reopen(tmp_path, fake_embedder):
    path = tmp_path / "c"
    with Collection.create(path, fake_embedder) as c:
        c.add_documents(PETS)
        c.delete_document("birds")
    with Collection.open(path, FakeEmbedder()) as c:
        info = c.info()
        assert (info.documents, info.chunks, info.embedder_name) == (3, 3, "fake-bow-64")
        assert c.search("dogs bark", top_k=1)[0].doc_id == "dogs"
        assert {d["id"] for d in c.documents()} == {"cats", "dogs", "stocks"}
    # Only the current index generation is kept on disk.
    assert len(list(path.glob("index-*.faiss"))) == 1


def test_embedder_mismatch(tmp_path, fake_embedder):
    path = tmp_path / "c"
    Collection.create(path, fake_embedder).close()
    with pytest.raises(EmbedderMismatch, match="fake-bow-64") as e:
        Collection.open(path, FakeEmbedder(dim=64, name="other"))
    assert e.value.status == 409
    with pytest.raises(EmbedderMismatch, match="dim 64"):
        Collection.open(path, FakeEmbedder(dim=32))


@pytest.mark.parametrize("damage", ["delete", "truncate", "wrong_generation"])
def test_damaged_index_is_rebuilt_from_stored_vectors(tmp_path, fake_embedder, damage):
    path = tmp_path / "c"
    with Collection.create(path, fake_embedder) as c:
        c.add_documents(PETS)
    (index_file,) = path.glob("index-*.faiss")
    if damage == "delete":
        index_file.unlink()
    elif damage == "truncate":
        index_file.write_bytes(index_file.read_bytes()[:100])
    else:
        # An index of an older state with a valid file: the checksum catches it.
        with Collection.create(tmp_path / "other", fake_embedder) as o:
            o.add_documents(PETS[:2])
        (other,) = (tmp_path / "other").glob("index-*.faiss")
        index_file.write_bytes(other.read_bytes())
    with Collection.open(path, fake_embedder) as c:
        _consistent(c)
        assert c.index_size() == 4
        assert c.search("stock markets", top_k=1)[0].doc_id == "stocks"


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    """Unit vectors around 50 centres: structured like real embeddings (a uniform random
    cloud has no neighbours worth finding, which no approximate index can exploit)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(50, d))
    x = centres[rng.integers(0, 50, n)] + 0.7 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _add_vectors(c: Collection, x: np.ndarray, start: int = 0) -> None:
    items = [
        (
            DocumentInput(f"d{start + i}", "v", {"group": (start + i) % 7}),
            [Chunk(f"d{start + i}", 0, "v", 0, 1, 1)],
            x[i : i + 1],
        )
        for i in range(len(x))
    ]
    c.add_embedded(items)


def test_approximate_index_above_threshold(tmp_path):
    emb = FakeEmbedder(dim=32)
    cfg = IndexConfig(approx_threshold=1000, nprobe=8)
    c = Collection.create(tmp_path / "c", emb, index_config=cfg)
    x = _clustered(4000, 32, seed=0)
    _add_vectors(c, x[:800])
    assert c.index_kind == "flat"
    _add_vectors(c, x[800:], start=800)
    assert c.index_kind == "ivf"
    _consistent(c)
    queries = _clustered(50, 32, seed=1)
    recall = []
    for q in queries:
        approx = {h.chunk_id for h in c.search_vector(q, top_k=10)}
        exact = {h.chunk_id for h in c.search_vector(q, top_k=10, exact=True)}
        recall.append(len(approx & exact) / 10)
    assert np.mean(recall) >= 0.9
    # Pre-filtering stays complete on IVF: a 1-in-7 filter still yields top_k hits.
    hits = c.search_vector(queries[0], top_k=100, filter={"group": 3})
    assert len(hits) == 100 and all(h.metadata["group"] == 3 for h in hits)
    # Removal works on IVF and survives reopen.
    c.delete_document("d5")
    c.close()
    c = Collection.open(tmp_path / "c", emb, index_config=cfg)
    assert c.index_kind == "ivf" and c.index_size() == 3999
    assert all(h.doc_id != "d5" for h in c.search_vector(x[5], top_k=5))
    c.close()


def test_ivf_falls_back_to_flat_when_small_again(tmp_path):
    emb = FakeEmbedder(dim=16)
    cfg = IndexConfig(approx_threshold=200)
    c = Collection.create(tmp_path / "c", emb, index_config=cfg)
    x = _clustered(300, 16, seed=2)
    items = [
        (DocumentInput("big", "v"), [Chunk("big", i, "v", 0, 1, 1) for i in range(250)], x[:250]),
        (
            DocumentInput("small", "v"),
            [Chunk("small", i, "v", 0, 1, 1) for i in range(50)],
            x[250:],
        ),
    ]
    c.add_embedded(items)
    assert c.index_kind == "ivf"
    c.delete_document("big")
    assert c.index_kind == "flat" and c.index_size() == 50
    c.close()


def test_real_embedder_relevant_document_first(tmp_path, real_embedder):
    docs = [
        DocumentInput("paris", "Paris is the capital and largest city of France."),
        DocumentInput("python", "Python is a programming language created by Guido van Rossum."),
        DocumentInput("photo", "Photosynthesis lets plants turn sunlight into chemical energy."),
        DocumentInput("jazz", "Jazz music originated in New Orleans in the early 20th century."),
    ]
    with Collection.create(tmp_path / "c", real_embedder) as c:
        c.add_documents(docs)
        for query, expected in [
            ("What is the capital of France?", "paris"),
            ("who invented the python language", "python"),
            ("how do plants get energy from light", "photo"),
        ]:
            hits = c.search(query, top_k=4)
            assert hits[0].doc_id == expected, (query, [h.doc_id for h in hits])
            assert hits[0].score > hits[1].score
