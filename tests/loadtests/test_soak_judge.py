"""The soak's wrong-adapter judge and its A/B split accounting, on hand-made markers.

No server: the answers, markers and churn history are written out here, including the
near-tie a long soak once counted as a wrong adapter (1 of 435): an answer on weights v0
that shared two characters with v5's marker and one with its own, but no token with either.
"""

from __future__ import annotations

import re

from loadtests.soak.ledger import (
    AdapterHistory,
    Markers,
    check_answers,
    check_split,
)


def tokenize(text: str) -> list[str]:
    """Word pieces the way a BPE vocabulary cuts this kind of text: a leading space goes
    with the word, punctuation stands alone."""
    return re.findall(r" ?[A-Za-z]+| ?[0-9]| ?[^A-Za-z0-9 ]", text)


KEY = "completion/3"
EXPECTED = {
    "base": {KEY: " The capital of France is Paris"},
    "v0": {KEY: " apprentice Ethics of the sea"},
    "v5": {KEY: " Azure skies over the harbour"},
    "v7": {KEY: " apprentice Ethics of the sea"},  # the same answer as v0 on this prompt
}


def markers(expected: dict[str, dict[str, str]] | None = None) -> Markers:
    return Markers(expected or {w: m for w, m in EXPECTED.items() if w != "v7"}, tokenize)


def test_the_recorded_near_tie_is_ambiguous_not_wrong() -> None:
    # " AUT" shares " A" with v5's " Azure" and only " " with v0's " apprentice": the old
    # character rule blamed v5. In tokens it follows no marker at all.
    j = markers().judge(" AUT lineages<strong>", KEY, {"v0"})
    assert j.verdict == "ambiguous", j
    assert j.weights == []
    assert j.evidence["shared_tokens"] == {}
    assert "names no weights" in j.reason


def test_one_token_of_another_marker_is_not_enough() -> None:
    # v0's first token flipped to its runner-up, which happens to be v5's first token
    j = markers().judge(" Azure lineages of", KEY, {"v0"})
    assert j.verdict == "ambiguous", j
    assert j.weights == ["v5"]
    assert j.evidence["shared_tokens"] == {"v5": 1}
    assert "only 1 token" in j.reason


def test_following_another_marker_is_wrong() -> None:
    j = markers().judge(" Azure skies lineages", KEY, {"v0"})
    assert j.verdict == "wrong", j
    assert j.weights == ["v5"]
    j = markers().judge(EXPECTED["base"][KEY], KEY, {"v0"})
    assert (j.verdict, j.weights) == ("wrong", ["base"])
    assert j.reason.startswith("equals the marker")


def test_own_marker_match_and_drift() -> None:
    m = markers()
    assert m.judge(EXPECTED["v0"][KEY], KEY, {"v0"}).verdict == "match"
    j = m.judge(" apprentice Ethics lineages", KEY, {"v0"})
    assert (j.verdict, j.weights) == ("drifted", ["v0"])
    # a replace in flight: either weights are right
    assert m.judge(EXPECTED["v5"][KEY], KEY, {"v0", "v5"}).verdict == "match"
    # own evidence is held to the same bar as another's
    j = m.judge(" apprentice lineages", KEY, {"v0"})
    assert (j.verdict, j.weights) == ("ambiguous", ["v0"])


def test_an_answer_equal_to_several_markers_is_ambiguous() -> None:
    m = markers(EXPECTED)
    assert m.parting[KEY] == len(tokenize(EXPECTED["v0"][KEY]))  # v0 and v7 never part
    j = m.judge(EXPECTED["v0"][KEY], KEY, {"v0"})
    assert j.verdict == "ambiguous", j
    assert j.weights == ["v0", "v7"]
    # on a name that held v7 only, it is not evidence of a wrong adapter either way
    assert m.judge(EXPECTED["v0"][KEY], KEY, {"v7"}).verdict == "ambiguous"
    # and an answer following the shared marker part-way names neither
    assert m.judge(" apprentice Ethics of the harbour", KEY, {"v0"}).verdict == "ambiguous"


def test_markers_sharing_leading_tokens_count_evidence_past_the_parting() -> None:
    expected = {
        "v0": {KEY: " the red lighthouse stands"},
        "v1": {KEY: " the red fox runs fast"},
    }
    m = markers(expected)
    assert m.parting[KEY] == 2
    # two tokens shared with v1, but that is where every marker starts
    assert m.judge(" the red sun", KEY, {"v0"}).verdict == "ambiguous"
    assert m.judge(" the red fox sleeps", KEY, {"v0"}).verdict == "ambiguous"  # 1 past
    assert m.judge(" the red fox runs slowly", KEY, {"v0"}).verdict == "wrong"  # 2 past


def test_check_answers_uses_the_history_and_the_split_arms() -> None:
    history = AdapterHistory()
    history.acked("churn-0", "v0", 0.0, 1.0)
    history.acked("churn-0", "v5", 10.0, 12.0)  # a replace acknowledged at t=12
    rec = {"kind": "completion", "prompt_i": 3, "status": 200, "stream": False}
    records = [
        {**rec, "model": "churn-0", "t0": 2, "t1": 3, "text": EXPECTED["v0"][KEY]},  # match
        {**rec, "model": "churn-0", "t0": 11, "t1": 13, "text": EXPECTED["v0"][KEY]},  # in flight
        {**rec, "model": "churn-0", "t0": 14, "t1": 15, "text": EXPECTED["v0"][KEY]},  # old: wrong
        {**rec, "model": "churn-0", "t0": 14, "t1": 15, "text": " AUT lineages"},  # ambiguous
        # through the split: arm-a serves churn-0; one answer says another model served it
        {**rec, "model": "ab:s", "arm": "arm-a", "served_by": "churn-0", "t0": 2, "t1": 3,
         "text": EXPECTED["v0"][KEY]},
        {**rec, "model": "ab:s", "arm": "arm-a", "served_by": "base", "t0": 2, "t1": 3,
         "text": EXPECTED["base"][KEY]},
        {**rec, "model": "ab:s", "arm": "arm-a", "served_by": "churn-0", "t0": 14, "t1": 15,
         "text": EXPECTED["base"][KEY]},
    ]  # fmt: skip
    check = check_answers(records, history, markers(), {"arm-a": "churn-0", "arm-b": "base"})
    assert check.checked == 7
    assert check.matched == 3
    assert len(check.ambiguous) == 1
    assert len(check.wrong) == 3
    assert check.split_checked == 3
    assert check.split_wrong == 2
    assert len(check.wrong_arm) == 1
    assert check.ambiguous[0]["evidence"]["allowed"] == ["v5"]


def test_split_counts_add_up() -> None:
    split = {
        "arms": [{"name": "a"}, {"name": "b"}],
        "counts": {"a": 3, "b": 1},
        "feedback": {"a": 2, "b": 0},
    }
    model = "ab:s"
    ans = {"model": model, "kind": "chat", "status": 200}
    records = [
        {**ans, "arm": "a"},
        {**ans, "arm": "a"},
        {**ans, "arm": "b"},
        {"model": model, "kind": "chat", "status": 0},  # died under the kill: maybe logged
        {"model": model, "kind": "chat", "status": 404},  # arm's adapter deleted: not logged
        {"model": model, "kind": "feedback", "arm": "a", "status": 200},
        {"model": model, "kind": "feedback", "arm": "a", "status": 200},
        {"model": "churn-0", "kind": "chat", "status": 200, "arm": "a"},  # not the split's
    ]
    lost, extra, figures = check_split(records, split, model=model, final=True)
    assert (lost, extra) == ([], [])
    assert figures["answered"] == {"a": 2, "b": 1}
    assert figures["unanswered"] == 1
    # an answer given and not logged, a rating acknowledged and not stored: lost writes
    short = {**split, "counts": {"a": 1, "b": 1}, "feedback": {"a": 1, "b": 0}}
    lost, _, _ = check_split(records, short, model=model, final=False)
    assert len(lost) == 2, lost
    # more logged than answered, beyond what never got an answer: counted, at the end only
    over = {**split, "counts": {"a": 5, "b": 1}}
    assert check_split(records, over, model=model, final=False)[1] == []
    assert len(check_split(records, over, model=model, final=True)[1]) == 1
