from __future__ import annotations

import pytest

from rag.collection import Hit
from rag.errors import InvalidArgument
from rag.prompt import augment_messages, build_prompt, citations, last_user_text

HITS = [
    Hit(0.91, "Paris is the capital of France.", "geo.md", 2, 10, 41, 7, {"lang": "en"}),
    Hit(0.55, "Lyon is a city " + "in France " * 40, "cities.txt", 0, 0, 415, 9, {}),
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is the capital of France?"},
]


def test_context_goes_into_last_user_message():
    out = augment_messages(MESSAGES, HITS)
    assert out[:3] == MESSAGES[:3]
    content = out[3]["content"]
    assert content.index("[1] (doc: geo.md, chunk 2)") < content.index("[2] (doc: cities.txt")
    assert content.index("Paris is the capital") < content.index(
        "Question: What is the capital of France?"
    )
    assert "[1]" in content and "cite" in content.lower()
    assert MESSAGES[3]["content"] == "What is the capital of France?"  # input untouched


def test_system_mode_and_no_hits():
    out = augment_messages(MESSAGES, HITS, mode="system")
    assert (
        out[0]["content"].startswith("You are terse.")
        and "[2] (doc: cities.txt" in out[0]["content"]
    )
    assert out[1:] == MESSAGES[1:]
    no_sys = augment_messages(MESSAGES[1:], HITS, mode="system")
    assert no_sys[0]["role"] == "system" and no_sys[1:] == MESSAGES[1:]
    assert augment_messages(MESSAGES, []) == MESSAGES


def test_content_parts_are_kept():
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Capital?"}]}]
    out = augment_messages(msgs, HITS)
    assert out[0]["content"][1] == {"type": "text", "text": "Capital?"}
    assert "Paris" in out[0]["content"][0]["text"]
    assert last_user_text(msgs) == "Capital?"


def test_errors():
    with pytest.raises(InvalidArgument):
        augment_messages([{"role": "system", "content": "x"}], HITS)
    with pytest.raises(InvalidArgument):
        last_user_text([])


def test_citations_and_single_prompt():
    cites = citations(HITS, snippet_chars=50)
    assert [c["index"] for c in cites] == [1, 2]
    assert cites[0] == {
        "index": 1,
        "doc_id": "geo.md",
        "chunk_index": 2,
        "score": 0.91,
        "snippet": "Paris is the capital of France.",
        "char_start": 10,
        "char_end": 41,
        "metadata": {"lang": "en"},
    }
    assert len(cites[1]["snippet"]) == 50 and cites[1]["snippet"].endswith("…")
    p = build_prompt("Capital of France?", HITS)
    assert p.endswith("Question: Capital of France?\nAnswer:") and "[1] (doc: geo.md" in p
