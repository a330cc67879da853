"""RAFT data builder on a small collection with the fake embedder: oracle choice, distractors,
the no-oracle fraction, the serving prompt, seeds, the trainer's validation, bad input."""

from __future__ import annotations

import argparse
import json
from collections import Counter

import pytest

from rag.collection import DocumentInput
from rag.errors import InvalidArgument
from rag.prompt import DEFAULT_INSTRUCTIONS, augment_messages
from rag.raft import (
    RaftConfig,
    RaftDataError,
    build_raft,
    parse_questions,
    read_questions,
    supports,
    write_jsonl,
)
from rag.store import CollectionStore
from trainer.data import load_jsonl

DOCS = {
    "ferry.md": "The ferry Puffin Lark sails to Haddon Quay twice a day; the crossing takes "
    "55 minutes.",
    "lighthouse.md": "Norrow Point lighthouse is 31 metres tall and flashes green.",
    "food.md": "Skerry pie is filled with smoked eel and samphire.",
    "council.md": "The island council has seven members; the Warden is Tobias Quenby.",
    "school.md": "Saltmere Academy has 180 pupils; its mascot is a grey seal named Barnaby.",
    "money.md": "Twelve tallets make one mark; tallets are brass tokens.",
    "wildlife.md": "The Marrowick storm petrel nests on Hollin Head; cats are banned.",
    "history.md": "Salt traders led by Agatha Venn settled the island in 1743.",
}
QUESTIONS = [
    {"id": "a", "question": "What is the ferry called?", "references": ["Puffin Lark"]},
    {"id": "b", "question": "How tall is the lighthouse?", "references": ["31 metres"]},
    {"id": "c", "question": "What is in skerry pie?", "references": ["smoked eel and samphire"]},
    {"id": "d", "question": "Who is the Warden?", "references": ["Tobias Quenby"]},
    {"id": "e", "question": "What is the school mascot?", "references": ["grey seal", "Barnaby"]},
    {"id": "f", "question": "How many tallets in a mark?", "references": ["twelve", "12"]},
    {"id": "g", "question": "Which bird nests on Hollin Head?", "references": ["storm petrel"]},
    {"id": "h", "question": "Who led the settlers?", "references": ["Agatha Venn"]},
    {"id": "i", "question": "When was it settled?", "references": ["1743"], "doc_id": "history.md"},
    {"id": "j", "question": "Where does the ferry go?", "references": ["Haddon Quay"]},
]


@pytest.fixture
def collection(tmp_path, fake_embedder):
    store = CollectionStore(tmp_path / "rag", fake_embedder)
    coll = store.create("kb")
    coll.add_documents([DocumentInput(id=k, text=v) for k, v in DOCS.items()])
    yield coll
    store.close()


def questions(items=QUESTIONS):
    return parse_questions([json.dumps(q) for q in items])


def test_examples_hold_oracle_and_distractors_in_the_serving_prompt(collection):
    cfg = RaftConfig(distractors=2, p_no_oracle=0.3, seed=7)
    records, stats = build_raft(collection, questions(), cfg)
    assert stats.examples == len(records) == 10
    assert (stats.with_oracle, stats.without_oracle) == (7, 3)  # round(0.3 * 10) without
    chunks = {(h.doc_id, h.chunk_index): h for h in collection.chunks()}
    by_id = {q["id"]: q for q in QUESTIONS}
    for rec in records:
        raft = rec["raft"]
        q = by_id[raft["question_id"]]
        user, assistant = rec["messages"]
        assert assistant == {"role": "assistant", "content": q["references"][0]}
        passages = [chunks[(p["doc_id"], p["chunk_index"])] for p in raft["passages"]]
        assert len(passages) == 3  # always k + 1 passages, as the server's top_k shows
        oracle = chunks[(raft["oracle"]["doc_id"], raft["oracle"]["chunk_index"])]
        assert supports(oracle.text, q["references"])
        assert (oracle in passages) == (raft["kind"] == "oracle")
        for p in passages:
            if p is not oracle:  # a distractor never holds the answer or shares its document
                assert p.doc_id != oracle.doc_id and not supports(p.text, q["references"])
        # the exact prompt the server builds for a `rag` chat request with these hits
        expected = augment_messages([{"role": "user", "content": q["question"]}], passages)
        assert [user] == expected
        assert user["content"].startswith(DEFAULT_INSTRUCTIONS)
        assert user["content"].endswith(f"Question: {q['question']}")
    # the oracle is not always in the same slot: the passages are shuffled
    slots = Counter(
        [(p["doc_id"], p["chunk_index"]) for p in r["raft"]["passages"]].index(
            (r["raft"]["oracle"]["doc_id"], r["raft"]["oracle"]["chunk_index"])
        )
        for r in records
        if r["raft"]["kind"] == "oracle"
    )
    assert len(slots) > 1


def test_oracle_by_doc_id_or_by_answer(collection):
    _, stats = build_raft(collection, questions(), RaftConfig(p_no_oracle=0))
    assert (stats.oracle_by_doc_id, stats.oracle_by_answer) == (1, 9)
    records, _ = build_raft(collection, questions(), RaftConfig(p_no_oracle=0))
    oracles = {r["raft"]["question_id"]: r["raft"]["oracle"]["doc_id"] for r in records}
    assert oracles["a"] == oracles["j"] == "ferry.md"
    assert oracles["i"] == "history.md" and oracles["h"] == "history.md"


def test_seeded_and_random_distractors(collection):
    qs = questions()
    a, _ = build_raft(collection, qs, RaftConfig(seed=1, p_no_oracle=0.5))
    b, _ = build_raft(collection, qs, RaftConfig(seed=1, p_no_oracle=0.5))
    c, _ = build_raft(collection, qs, RaftConfig(seed=2, p_no_oracle=0.5))
    assert a == b
    assert a != c
    r, _ = build_raft(collection, qs, RaftConfig(distractor_source="random", distractors=3))
    assert all(len(x["raft"]["passages"]) == 4 for x in r)


def test_closed_book_copies_and_citations(collection):
    cfg = RaftConfig(closed_book=0.5, cite=True, p_no_oracle=0)
    records, stats = build_raft(collection, questions(), cfg)
    closed = [r for r in records if r["raft"]["kind"] == "closed_book"]
    assert stats.closed_book == len(closed) == 5 and stats.examples == 15
    by_id = {q["id"]: q for q in QUESTIONS}
    for r in closed:
        q = by_id[r["raft"]["question_id"]]
        assert r["messages"][0] == {"role": "user", "content": q["question"]}
    for r in records:
        if r["raft"]["kind"] == "oracle":
            pos = [(p["doc_id"], p["chunk_index"]) for p in r["raft"]["passages"]].index(
                (r["raft"]["oracle"]["doc_id"], r["raft"]["oracle"]["chunk_index"])
            )
            assert r["messages"][-1]["content"].endswith(f" [{pos + 1}]")


def test_output_passes_the_trainers_validation(collection, tmp_path):
    records, _ = build_raft(collection, questions(), RaftConfig(closed_book=0.2))
    path = tmp_path / "raft.jsonl"
    assert write_jsonl(records, path) == len(records)
    data = load_jsonl(path, task="sft")
    assert data.format == "chat" and len(data.examples) == len(records)


def test_bad_question_sets_name_every_problem(tmp_path):
    lines = [
        json.dumps({"question": "no refs"}),
        json.dumps({"question": "", "references": ["x"]}),
        "{not json",
        json.dumps({"question": "q", "references": []}),
        json.dumps({"question": "q", "reference": "x", "references": ["x"]}),
        json.dumps({"id": "dup", "question": "q", "references": ["x"]}),
        json.dumps({"id": "dup", "question": "q", "references": ["x"]}),
    ]
    with pytest.raises(RaftDataError) as exc:
        parse_questions(lines)
    msg = str(exc.value)
    for n, needle in enumerate(
        ["`references` is missing", "`question`", "malformed JSON", "non-empty list",
         "unknown field(s) reference", "repeats line 6"],
        start=1,
    ):  # fmt: skip
        assert f"line {n if n < 6 else 7}: " in msg and needle in msg, (n, msg)
    with pytest.raises(RaftDataError, match="empty"):
        parse_questions(["", "  "])
    with pytest.raises(RaftDataError, match="no such file"):
        read_questions(tmp_path / "missing.jsonl")


def test_questions_the_collection_cannot_answer(collection):
    bad = [
        {"id": "x", "question": "What colour is the sky?", "references": ["mauve"]},
        {"id": "y", "question": "Ferry?", "references": ["Puffin Lark"], "doc_id": "nope.md"},
    ]
    with pytest.raises(RaftDataError) as exc:
        build_raft(collection, questions(QUESTIONS[:2] + bad))
    msg = str(exc.value)
    assert "line 3 (x): no chunk of the collection contains" in msg and "doc_id" in msg
    assert "line 4 (y): doc_id 'nope.md' is not in the collection" in msg
    with pytest.raises(InvalidArgument, match="p_no_oracle"):
        build_raft(collection, questions(), RaftConfig(p_no_oracle=1.5))
    with pytest.raises(InvalidArgument, match="distractors"):
        RaftConfig(distractors=-1).validate()


def test_cli(tmp_path, fake_embedder, monkeypatch, capsys):
    from rag import cli

    store = CollectionStore(tmp_path / "rag", fake_embedder)
    store.create("kb").add_documents([DocumentInput(id=k, text=v) for k, v in DOCS.items()])
    monkeypatch.setattr(cli, "_store", lambda args: store)
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))

    def run(*argv: str) -> int:
        parser = argparse.ArgumentParser(prog="swapserve")
        cli.register(parser.add_subparsers(dest="command"))
        args = parser.parse_args(["rag", "raft", *argv])
        return args.func(args)

    out = tmp_path / "out" / "raft.jsonl"
    assert run("kb", str(qfile), "--out", str(out), "--p-no-oracle", "0.5", "--seed", "3") == 0
    printed = capsys.readouterr()
    assert "10 examples from 10 questions (5 with the oracle, 5 without" in printed.out
    assert "raft from kb" in printed.err  # the progress bar
    assert len(load_jsonl(out, task="sft").examples) == 10
    assert run("nope", str(qfile), "--out", str(out)) == 1
    assert "no collection named 'nope'" in capsys.readouterr().err
    qfile.write_text('{"question": "x"}\n')
    assert run("kb", str(qfile), "--out", str(out)) == 1
    assert "line 1: `references` is missing" in capsys.readouterr().err
    assert run("kb", str(qfile), "--out", str(out), "--candidates", "0") == 1
    assert "candidates" in capsys.readouterr().err
    assert len(load_jsonl(out, task="sft").examples) == 10  # failed runs left it as it was
