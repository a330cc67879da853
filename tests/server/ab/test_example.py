"""The committed Marrowick example (server/ab/examples/marrowick) is consistent: every
question is valid for an experiment, its answer is in the note it names, the RAFT builder
accepts the training paraphrases, and experiments report how often retrieval found the
named document."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rag.collection import DocumentInput
from rag.raft import RaftConfig, build_raft, read_questions, supports
from rag.store import CollectionStore
from server.ab.experiments import summarize
from server.ab.metrics import score_answer
from server.ab.models import Question
from server.ab.report import render_report
from tests.rag.fake_embedder import FakeEmbedder

EXAMPLE = Path(__file__).parents[3] / "server" / "ab" / "examples" / "marrowick"


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    store = CollectionStore(tmp_path_factory.mktemp("rag"), FakeEmbedder())
    coll = store.create("marrowick")
    coll.add_documents(
        [DocumentInput(id=p.name, text=p.read_text()) for p in sorted(EXAMPLE.glob("kb/*.md"))]
    )
    yield coll
    store.close()


@pytest.mark.parametrize("name", ["questions.jsonl", "train_questions.jsonl"])
def test_question_sets_are_valid_and_answered_by_their_note(name):
    lines = (EXAMPLE / name).read_text().splitlines()
    assert 20 <= len(lines) <= 30
    for line in lines:
        q = Question.model_validate(json.loads(line))  # what POST /ab/experiments accepts
        note = (EXAMPLE / "kb" / q.doc_id).read_text()
        assert supports(note, q.references), (q.id, q.references)


def test_training_paraphrases_differ_from_the_evaluation_questions():
    ev = read_questions(EXAMPLE / "questions.jsonl")
    tr = read_questions(EXAMPLE / "train_questions.jsonl")
    assert [q.references for q in ev] == [q.references for q in tr]
    assert not {q.question for q in ev} & {q.question for q in tr}


def test_raft_builds_from_the_example(collection):
    qs = read_questions(EXAMPLE / "train_questions.jsonl")
    records, stats = build_raft(collection, qs, RaftConfig(distractors=1, closed_book=0.5))
    assert stats.oracle_by_doc_id == len(qs)
    assert stats.examples == len(qs) + round(0.5 * len(qs))
    assert all(r["messages"][-1]["role"] == "assistant" for r in records)


def test_summary_reports_retrieval_hit_rate():
    questions = [
        {"id": "a", "question": "?", "references": ["x"], "doc_id": "d1"},
        {"id": "b", "question": "?", "references": ["y"], "doc_id": "d2"},
        {"id": "c", "question": "?", "references": ["z"]},  # no doc_id: not counted
    ]

    def answer(arm: str, docs: list[str]) -> dict:
        return {
            "arm": arm,
            "answer": "x",
            "scores": score_answer("x", ["x"]),
            "latency_s": 1.0,
            "ttft_s": 0.5,
            "prompt_tokens": 3,
            "completion_tokens": 1,
            "doc_ids": docs,
            "error": None,
        }

    rec = {
        "seed": 0,
        "arms": [{"name": "base"}, {"name": "rag", "rag": {"collection": "kb"}}],
        "questions": questions,
        "results": [
            [answer("base", []), answer("rag", ["d1", "d9"])],
            [answer("base", []), answer("rag", ["d9"])],
            [answer("base", []), answer("rag", ["d2"])],
        ],
    }
    summary = summarize(rec)
    assert summary["arms"]["base"]["retrieval_hit_rate"] is None
    assert summary["arms"]["rag"]["retrieval_hit_rate"] == 0.5
    rec.update(id="abx-1", status="completed", progress={"done": 3, "total": 3}, summary=summary)
    rec["arms"] = [{**a, "model": "base"} for a in rec["arms"]]
    html = render_report(rec)
    assert "Retrieval hit" in html and "<td class='n'>0.50</td>" in html
