"""Unit tests of the feedback exports (server/ab/splits.py): every line they write is one
the trainer's own parser accepts, in the shape TRL's trainers read; what it would refuse is
left out with its reason; nothing to export is a 404 that says why."""

from __future__ import annotations

import pytest

from server.ab.splits import SplitService
from server.errors import APIError
from server.schemas import FeedbackRequest, SplitArm, SplitRequest
from trainer.formats import Problem, parse_line

SYSTEM_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky?"}]


@pytest.fixture
def splits(tmp_path) -> SplitService:
    service = SplitService(tmp_path, check_arm=lambda model, rag: None)
    arms = [SplitArm(name="a", model="base"), SplitArm(name="b", model="tuned")]
    service.create(SplitRequest(name="s", arms=arms))
    return service


def serve(service: SplitService, rid: str, prompt, completion: str, arm: int = 0) -> str:
    split = service.splits["s"]
    service._record(rid, "s", split.arms[arm], prompt, completion, None)
    return rid


def rate(service: SplitService, rid: str, rating: int | None = None, over: str | None = None):
    service.add_feedback(FeedbackRequest(response_id=rid, rating=rating, preferred_over=over))


def accepted(line: dict, task: str) -> bool:
    problems: list[Problem] = []
    parse_line(line, 1, task, problems)  # type: ignore[arg-type]
    return not problems


def test_chat_answers_export_as_assistant_messages(splits):
    serve(splits, "r1", SYSTEM_CHAT, "Blue.")
    serve(splits, "r2", SYSTEM_CHAT, "The sky is a dome of...", arm=1)
    rate(splits, "r1", 1)
    rate(splits, "r2", 1)
    rate(splits, "r2", -1)  # the latest rating counts
    export = splits.rated_answers("s")
    assert export.left_out == []
    assert export.lines == [
        {"prompt": SYSTEM_CHAT, "completion": [{"role": "assistant", "content": "Blue."}],
         "label": True},
        {"prompt": SYSTEM_CHAT,
         "completion": [{"role": "assistant", "content": "The sky is a dome of..."}],
         "label": False},
    ]  # fmt: skip
    assert all(accepted(line, "kto") for line in export.lines)
    # the same two ratings make one DPO pair, in the same shape
    (pair,) = splits.preference_pairs("s").lines
    assert pair["chosen"] == [{"role": "assistant", "content": "Blue."}]
    assert pair["rejected"] == [{"role": "assistant", "content": "The sky is a dome of..."}]
    assert accepted(pair, "dpo")


def test_completion_answers_export_as_text(splits):
    serve(splits, "c1", "Once upon a time", " there was a fox.")
    rate(splits, "c1", -1)
    assert splits.rated_answers("s").lines == [
        {"prompt": "Once upon a time", "completion": " there was a fox.", "label": False}
    ]


def test_a_comparison_labels_both_answers(splits):
    serve(splits, "w", SYSTEM_CHAT, "Blue.")
    serve(splits, "l", SYSTEM_CHAT, "Green.")
    rate(splits, "w", over="l")
    labels = {line["completion"][0]["content"]: line["label"] for line in splits.rated_answers("s").lines}  # fmt: skip
    assert labels == {"Blue.": True, "Green.": False}


def test_lines_the_trainer_would_refuse_are_left_out_with_the_reason(splits):
    tool_turn = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "w", "arguments": {}}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    ]  # fmt: skip
    serve(splits, "tool", tool_turn, "Sunny today.")
    serve(
        splits, "users", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "x"
    )
    serve(splits, "prefill", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "c")  # fmt: skip
    serve(splits, "empty", SYSTEM_CHAT, "   ")
    serve(splits, "good", SYSTEM_CHAT, "Blue.")
    for rid in ("tool", "users", "prefill", "empty", "good"):
        rate(splits, rid, 1)
    export = splits.rated_answers("s")
    assert [line["completion"][0]["content"] for line in export.lines] == ["Blue."]
    reasons = dict(export.left_out)
    assert set(reasons) == {"tool", "users", "prefill", "empty"}
    assert "tool" in reasons["tool"]
    assert "alternate" in reasons["users"]
    assert "end with a user turn" in reasons["prefill"]
    assert "empty" in reasons["empty"]
    assert export.jsonl().count("\n") == 1


def test_nothing_to_export_is_a_404_saying_why(splits):
    with pytest.raises(APIError) as exc:
        splits.rated_answers("s").jsonl()
    assert exc.value.status == 404 and exc.value.code == "no_feedback"
    assert "no feedback to export yet" in exc.value.message
    assert "POST /ab/feedback" in exc.value.message

    # rated, but every answer left out: the count and the first reason
    serve(splits, "e", SYSTEM_CHAT, "")
    rate(splits, "e", 1)
    with pytest.raises(APIError) as exc:
        splits.rated_answers("s").jsonl()
    assert "1 left out (first: e: completion[0].content: empty string)" in exc.value.message

    # thumbs up only: KTO data, but no DPO pair
    serve(splits, "g", SYSTEM_CHAT, "Blue.")
    rate(splits, "g", 1)
    assert len(splits.rated_answers("s").lines) == 1
    with pytest.raises(APIError) as exc:
        splits.preference_pairs("s").jsonl()
    assert "no preference pairs" in exc.value.message and "kto.jsonl" in exc.value.message


def test_unknown_split_and_unknown_response(splits):
    with pytest.raises(APIError) as exc:
        splits.rated_answers("nope")
    assert exc.value.status == 404 and exc.value.code == "split_not_found"
    with pytest.raises(APIError) as exc:
        rate(splits, "never-served", 1)
    assert exc.value.status == 404 and exc.value.code == "response_not_found"
    assert splits.feedback == []
    assert not (splits.root / "splits" / "s" / "feedback.jsonl").exists()
