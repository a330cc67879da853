"""A/B on the tiny model through the real server: an experiment end to end, its report,
sticky splits, feedback exported as DPO data the trainer accepts, and every bad input."""

from __future__ import annotations

import time
from collections import Counter

import httpx
import pytest

from server.ab.splits import assign_arm
from tests.support import start_tiny_server_with_adapter
from trainer.data import load_jsonl

QUESTIONS = [
    {"id": "q1", "question": "What is the capital of France?", "references": ["Paris"]},
    {"question": "Say hello.", "references": ["hello", "hi there"]},
    {"question": "Two plus two?", "references": ["four", "4"]},
]


@pytest.fixture(scope="module")
def server(tiny_model_path, tmp_path_factory):
    server = start_tiny_server_with_adapter(tiny_model_path, tmp_path_factory, "ab", seed=1)
    yield server
    server.stop()


def wait(server, exp_id: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = httpx.get(f"{server.url}/ab/experiments/{exp_id}").json()
        if body["status"] != "running":
            return body
        time.sleep(0.2)
    raise TimeoutError(exp_id)


def assert_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_experiment_end_to_end_and_report(server):
    r = httpx.post(
        f"{server.url}/ab/experiments",
        json={
            "name": "smoke",
            "questions": QUESTIONS,
            "arms": [{"name": "base", "model": "base"}, {"name": "tuned", "model": "tuned"}],
            "max_tokens": 6,
        },
    )
    assert r.status_code == 202, r.text
    exp = r.json()
    assert exp["status"] == "running" and exp["progress"]["total"] == 3
    done = wait(server, exp["id"])
    assert done["status"] == "completed", done
    assert done["progress"]["done"] == 3
    arms = done["summary"]["arms"]
    assert set(arms) == {"base", "tuned"}
    for arm in arms.values():
        assert arm["n"] == 3 and arm["errors"] == 0
        assert set(arm["scores"]) == {"exact_match", "token_f1", "rouge_l"}
        assert arm["completion_tokens"] > 0 and arm["prompt_tokens"] > 0
        assert 0 < arm["ttft_s"]["mean"] <= arm["latency_s"]["mean"]
    (cmp,) = done["summary"]["comparisons"]
    assert cmp["arm"] == "tuned" and cmp["baseline"] == "base"
    assert cmp["token_f1"]["low"] <= cmp["token_f1"]["diff"] <= cmp["token_f1"]["high"]
    q = done["questions"][1]
    assert q["id"] == "q2" and [a["arm"] for a in q["answers"]] == ["base", "tuned"]
    assert all(a["doc_ids"] == [] and "scores" in a for a in q["answers"])

    html = httpx.get(f"{server.url}/ab/experiments/{exp['id']}/report")
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert "<svg" in html.text and "tuned" in html.text and "What is the capital" in html.text
    assert "<script" not in html.text and "http://" not in html.text.replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )

    listed = httpx.get(f"{server.url}/ab/experiments").json()["data"]
    assert exp["id"] in [e["id"] for e in listed]


def test_arms_take_stop_sequences(server):
    arms = [{"name": "base", "model": "base"}, {"name": "cut", "model": "base", "stop": [" "]}]
    body = {"questions": QUESTIONS, "arms": arms, "max_tokens": 6}
    r = httpx.post(f"{server.url}/ab/experiments", json=body)
    assert r.status_code == 202, r.text
    done = wait(server, r.json()["id"])
    assert done["status"] == "completed", done
    pairs = [[a["answer"] for a in q["answers"]] for q in done["questions"]]
    for full, cut in pairs:
        assert " " not in cut and full.startswith(cut)
    assert any(len(cut) < len(full) for full, cut in pairs), pairs
    too_many = [{"name": "x", "model": "base", "stop": ["a", "b", "c", "d", "e"]}]
    r = httpx.post(f"{server.url}/ab/experiments", json={**body, "arms": too_many})
    assert r.status_code == 400 and "stop" in r.json()["error"]["param"]


def test_experiment_cancel_and_restart_marks_interrupted(server, tmp_path):
    from server.ab.experiments import ExperimentService

    r = httpx.post(
        f"{server.url}/ab/experiments",
        json={
            "questions": QUESTIONS * 10,
            "arms": [{"name": "b", "model": "base"}, {"name": "t", "model": "tuned"}],
            "concurrency": 1,
        },
    )
    exp_id = r.json()["id"]
    # no max_tokens anywhere: both arms answer within the references' budget
    assert r.json()["budget"]["arms"] == ["b", "t"]
    assert [a["max_tokens"] for a in r.json()["arms"]] == [r.json()["budget"]["max_tokens"]] * 2
    r = httpx.delete(f"{server.url}/ab/experiments/{exp_id}")
    assert r.status_code == 200
    assert wait(server, exp_id)["status"] == "cancelled"
    # a record left "running" by a dead server comes back as interrupted
    record = server.app.state.ab_experiments.records[exp_id]
    stale = {**record, "id": "abx-stale", "status": "running"}
    svc = ExperimentService(tmp_path, serving=None, check_arm=None, base_model="base")  # type: ignore[arg-type]
    svc._save(stale)
    svc2 = ExperimentService(tmp_path, serving=None, check_arm=None, base_model="b")  # type: ignore[arg-type]
    svc2.recover()
    assert svc2.records["abx-stale"]["status"] == "interrupted"


def test_assignment_proportions_and_stickiness():
    weights = [0.7, 0.2, 0.1]
    counts = Counter(assign_arm("s", weights, f"user-{i}") for i in range(400))
    for arm, w in enumerate(weights):
        assert abs(counts[arm] / 400 - w) < 0.07, counts  # ~3 standard errors
    assert all(
        assign_arm("s", weights, "alice") == assign_arm("s", weights, "alice") for _ in range(20)
    )
    assert assign_arm("s", [0, 1], "anyone") == 1
    assert {assign_arm("s", [1, 1], None) for _ in range(200)} == {0, 1}


def test_split_sticky_feedback_and_dpo_export(server, tmp_path):
    r = httpx.post(
        f"{server.url}/ab/splits",
        json={
            "name": "exp1",
            "arms": [
                {"name": "control", "model": "base", "weight": 1},
                {"name": "treat", "model": "tuned", "weight": 1},
            ],
        },
    )
    assert r.status_code == 201, r.text
    client = server.openai()
    seen = {}
    ids = []
    for user in ("u1", "u2", "u3", "u4", "u5", "u6"):
        arms = set()
        for _ in range(3):
            resp = client.chat.completions.create(
                model="ab:exp1",
                messages=[{"role": "user", "content": "Tell me something."}],
                max_tokens=6,
                temperature=1.0,
                user=user,
            )
            arms.add(resp.model_extra["ab_arm"])
            assert resp.model == {"control": "base", "treat": "tuned"}[resp.model_extra["ab_arm"]]
            ids.append((resp.id, resp.model_extra["ab_arm"], resp.choices[0].message.content))
        assert len(arms) == 1, (user, arms)  # sticky
        seen[user] = arms.pop()
    # streamed responses are routed, tagged and logged too
    stream = client.chat.completions.create(
        model="ab:exp1",
        messages=[{"role": "user", "content": "Tell me something."}],
        max_tokens=6,
        stream=True,
        user="u1",
    )
    chunks = list(stream)
    assert {c.model_extra.get("ab_arm") for c in chunks} == {seen["u1"]}
    split = httpx.get(f"{server.url}/ab/splits/exp1").json()
    assert sum(split["counts"].values()) == 19

    distinct = {}
    for rid, _arm, text in ids:
        distinct.setdefault(text, rid)
    pair = list(distinct.values())[:2]
    assert len(pair) == 2, "the tiny model gave the same answer every time"
    r = httpx.post(
        f"{server.url}/ab/feedback", json={"response_id": pair[0], "preferred_over": pair[1]}
    )
    assert r.status_code == 200, r.text
    assert r.json()["split"] == "exp1"
    assert (
        httpx.post(
            f"{server.url}/ab/feedback", json={"response_id": pair[1], "rating": -1}
        ).status_code
        == 200
    )
    assert (
        httpx.post(
            f"{server.url}/ab/feedback", json={"response_id": pair[0], "rating": 1}
        ).status_code
        == 200
    )

    r = httpx.get(f"{server.url}/ab/splits/exp1/preferences.jsonl")
    assert r.status_code == 200
    path = tmp_path / "prefs.jsonl"
    path.write_text(r.text)
    data = load_jsonl(path, task="dpo")  # the trainer's own validation
    assert data.format == "preference" and len(data.examples) == 1  # the same pair, once

    # the same feedback as KTO data: each rated answer once, with its latest rating
    r = httpx.get(f"{server.url}/ab/splits/exp1/kto.jsonl")
    assert r.status_code == 200
    path = tmp_path / "kto.jsonl"
    path.write_text(r.text)
    data = load_jsonl(path, task="kto")
    assert data.format == "unpaired"
    assert sorted(e.label for e in data.examples) == [False, True]


def test_kto_on_exported_feedback_registers_an_adapter(server, tmp_path, tiny_model_path):
    """Thumbs up/down through POST /ab/feedback -> kto.jsonl -> `swapserve train kto
    --server` -> an adapter served by name."""
    from trainer import cli

    arms = [
        {"name": "control", "model": "base", "weight": 1},
        {"name": "treat", "model": "tuned", "weight": 1},
    ]
    assert httpx.post(f"{server.url}/ab/splits", json={"name": "fb", "arms": arms}).is_success
    client = server.openai()
    for i, user in enumerate(f"k{n}" for n in range(8)):
        resp = client.chat.completions.create(
            model="ab:fb",
            messages=[{"role": "user", "content": f"Tell me about the sea, take {i}."}],
            max_tokens=6,
            temperature=1.0,
            user=user,
        )
        rating = 1 if i % 2 == 0 else -1
        r = httpx.post(f"{server.url}/ab/feedback", json={"response_id": resp.id, "rating": rating})
        assert r.status_code == 200, r.text
    export = tmp_path / "feedback-kto.jsonl"
    export.write_text(httpx.get(f"{server.url}/ab/splits/fb/kto.jsonl").text)
    rated = load_jsonl(export, task="kto").examples
    assert len(rated) >= 6 and {e.label for e in rated} == {True, False}

    code = cli.main(
        ["train", "kto", "--data", str(export), "--name", "kto-fb", "--base", str(tiny_model_path),
         "--quantization", "none", "--device", "cpu", "--rank", "4", "--max-steps", "2",
         "--eval-fraction", "0", "--max-length", "128", "--output-dir", str(tmp_path / "kto-fb"),
         "--server", server.url]
    )  # fmt: skip
    assert code == 0
    names = [a["name"] for a in httpx.get(f"{server.url}/adapters").json()["data"]]
    assert "kto-fb" in names
    resp = client.chat.completions.create(
        model="kto-fb", messages=[{"role": "user", "content": "Hello"}], max_tokens=4
    )
    assert resp.model == "kto-fb" and resp.choices[0].finish_reason in ("stop", "length")


def test_split_routes_completions(server, tmp_path):
    """`ab:<split>` on /v1/completions: sticky arm, tagged, logged, rated like chat."""
    arms = [
        {"name": "control", "model": "base", "weight": 1},
        {"name": "treat", "model": "tuned", "weight": 1},
    ]
    r = httpx.post(f"{server.url}/ab/splits", json={"name": "comp", "arms": arms})
    assert r.status_code == 201, r.text
    client = server.openai()
    by_user: dict[str, set[str]] = {}
    responses = []
    for user in ("c1", "c2", "c3", "c4", "c5", "c6"):
        for _ in range(2):
            resp = client.completions.create(
                model="ab:comp", prompt="Once upon a time", max_tokens=5, temperature=1.0, user=user
            )
            arm = resp.model_extra["ab_arm"]
            by_user.setdefault(user, set()).add(arm)
            assert resp.model == {"control": "base", "treat": "tuned"}[arm]
            assert resp.id.startswith("cmpl-")
            responses.append((resp.id, resp.choices[0].text))
    assert all(len(a) == 1 for a in by_user.values()), by_user  # sticky per user
    assert {a for s in by_user.values() for a in s} == {"control", "treat"}
    expected = {"control": "base", "treat": "tuned"}
    stream = client.completions.create(
        model="ab:comp", prompt="Once upon a time", max_tokens=4, stream=True, user="c1"
    )
    chunks = list(stream)
    (arm_c1,) = by_user["c1"]
    assert {c.model_extra.get("ab_arm") for c in chunks} == {arm_c1}
    assert {c.model for c in chunks} == {expected[arm_c1]}
    split = httpx.get(f"{server.url}/ab/splits/comp").json()
    assert sum(split["counts"].values()) == 13  # every answer logged, streamed ones too

    # feedback on completions: the logged prompt is the string, and DPO export takes it
    distinct = {text: rid for rid, text in responses}
    good, bad = list(distinct.values())[:2]
    for rid, rating in ((good, 1), (bad, -1)):
        r = httpx.post(f"{server.url}/ab/feedback", json={"response_id": rid, "rating": rating})
        assert r.status_code == 200, r.text
    r = httpx.post(f"{server.url}/ab/feedback", json={"response_id": good, "preferred_over": good})
    assert assert_error(r, 400)["param"] == "preferred_over"  # was a TypeError (500)
    path = tmp_path / "prefs.jsonl"
    path.write_text(httpx.get(f"{server.url}/ab/splits/comp/preferences.jsonl").text)
    data = load_jsonl(path, task="dpo")
    assert len(data.examples) == 1 and data.examples[0].prompt == "Once upon a time"

    # a batch of prompts cannot be logged against one response: a 400, nothing logged
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": "ab:comp", "prompt": ["a", "b"], "max_tokens": 2},
    )
    assert assert_error(r, 400)["param"] == "prompt"
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "ab:none", "prompt": "a"})
    assert assert_error(r, 404)["code"] == "model_not_found"
    assert sum(httpx.get(f"{server.url}/ab/splits/comp").json()["counts"].values()) == 13


def test_bad_inputs(server):
    url = server.url
    arms = [{"name": "b", "model": "base"}, {"name": "t", "model": "tuned"}]
    err = assert_error(
        httpx.post(f"{url}/ab/experiments", json={"questions": [], "arms": arms}), 400
    )
    assert err["param"] == "questions"
    err = assert_error(
        httpx.post(f"{url}/ab/experiments", json={"questions": [{"question": "x"}], "arms": arms}),
        400,
    )
    assert "references" in err["param"]
    q = [{"question": "x", "references": ["y"]}]
    err = assert_error(
        httpx.post(
            f"{url}/ab/experiments",
            json={"questions": q, "arms": [arms[0], {"name": "n", "model": "nope"}]},
        ),
        404,
    )
    assert err["code"] == "model_not_found" and err["param"] == "arms.1.model"
    err = assert_error(
        httpx.post(
            f"{url}/ab/experiments",
            json={"questions": q, "arms": [arms[0], {**arms[1], "rag": {"collection": "nope"}}]},
        ),
        404,
    )
    assert err["code"] == "collection_not_found" and err["param"] == "arms.1.rag.collection"
    # default arms need something to compare
    assert_error(httpx.post(f"{url}/ab/experiments", json={"questions": q}), 400)
    err = assert_error(
        httpx.post(f"{url}/ab/experiments", json={"questions": q, "adapter": "nope"}), 404
    )
    assert err["code"] == "model_not_found"
    assert_error(httpx.get(f"{url}/ab/experiments/abx-missing"), 404)
    assert_error(httpx.get(f"{url}/ab/experiments/abx-missing/report"), 404)

    zero = [
        {"name": "a", "model": "base", "weight": 0},
        {"name": "b", "model": "tuned", "weight": 0},
    ]
    err = assert_error(httpx.post(f"{url}/ab/splits", json={"name": "z", "arms": zero}), 400)
    assert err["code"] == "invalid_weights"
    neg = [{"name": "a", "model": "base", "weight": -1}]
    assert_error(httpx.post(f"{url}/ab/splits", json={"name": "z", "arms": neg}), 400)
    bad_rag = [{"name": "a", "model": "base", "rag": {"collection": "docs", "top_k": 0}}]
    err = assert_error(httpx.post(f"{url}/ab/splits", json={"name": "z", "arms": bad_rag}), 400)
    assert err["param"] == "arms.0.rag.top_k"
    unknown = [{"name": "a", "model": "nope"}]
    assert_error(httpx.post(f"{url}/ab/splits", json={"name": "z", "arms": unknown}), 404)
    assert_error(httpx.get(f"{url}/ab/splits/z/preferences.jsonl"), 404)
    assert_error(httpx.get(f"{url}/ab/splits/z/kto.jsonl"), 404)
    err = assert_error(
        httpx.post(f"{url}/ab/feedback", json={"response_id": "chatcmpl-x", "rating": 1}), 404
    )
    assert err["code"] == "response_not_found"
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "ab:nope", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert assert_error(r, 404)["code"] == "model_not_found"


def test_cli_ab_run(server, tmp_path, capsys):
    from server.ab.cli import parse_arm
    from server.cli import main

    assert parse_arm("r=tuned,rag=docs") == {
        "name": "r",
        "model": "tuned",
        "rag": {"collection": "docs"},
    }
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(__import__("json").dumps(q) for q in QUESTIONS[:2]) + "\n")
    out = tmp_path / "report.html"
    argv = ["ab", "run", str(questions), "--arm", "b=base", "--arm", "t=tuned"]
    argv += ["--server", server.url, "--out", str(out), "--max-tokens", "4", "--poll", "0.2"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "ROUGE-L" in table and "t-b F1" in table
    assert "<svg" in out.read_text()
