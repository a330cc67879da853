"""The feedback loop as a user runs it, on the tiny model through the real server:
an online split over two arms, traffic from the `openai` SDK, thumbs up/down through
`POST /ab/feedback`, `swapserve ab export` writing KTO data, `swapserve train kto` on that
file, and the new adapter registered and answering, first by name, then as an arm of a
new split. Bad input on the way changes nothing stored and writes no file."""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest

from server.cli import main as swapserve
from tests.support import start_tiny_server_with_adapter
from trainer.base_model import ensure_chat_template
from trainer.data import load_jsonl

# conversations as applications send them: a system prompt (also as OpenAI's newer
# `developer` role), several turns, content as a list of text parts
CONVERSATIONS = [
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Sky?"}],
    [{"role": "developer", "content": "Be terse."}, {"role": "user", "content": "Sea colour?"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "Name a fruit."},
    ],
    [{"role": "user", "content": [{"type": "text", "text": "Name "}, {"type": "text", "text": "a tree."}]}],
]  # fmt: skip


@pytest.fixture(scope="module")
def server(tiny_model_path, tmp_path_factory):
    server = start_tiny_server_with_adapter(tiny_model_path, tmp_path_factory, "kto-loop", seed=3)
    yield server
    server.stop()


def feedback_counts(server, split: str) -> dict[str, int]:
    return httpx.get(f"{server.url}/ab/splits/{split}").json()["feedback"]


def stored_feedback(server, split: str) -> str:
    path = server.data_dir / "ab" / "splits" / split / "feedback.jsonl"
    return path.read_text() if path.is_file() else ""


def test_split_feedback_export_train_kto_serve(server, tiny_model_path, tmp_path, capsys):
    url = server.url
    arms = [
        {"name": "control", "model": "base", "weight": 1},
        {"name": "treat", "model": "tuned", "weight": 1},
    ]
    r = httpx.post(f"{url}/ab/splits", json={"name": "loop", "arms": arms})
    assert r.status_code == 201, r.text
    out = tmp_path / "kto.jsonl"

    # nothing rated yet: the export says so and writes nothing
    r = httpx.get(f"{url}/ab/splits/loop/kto.jsonl")
    assert r.status_code == 404, r.text
    err = r.json()["error"]
    assert err["code"] == "no_feedback" and "POST /ab/feedback" in err["message"]
    assert swapserve(["ab", "export", "loop", "--out", str(out), "--server", url]) == 1
    assert "no feedback to export yet" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []

    # traffic through the split with the openai SDK, sticky per user
    client = server.openai()
    served = []
    for i in range(12):
        messages = CONVERSATIONS[i % len(CONVERSATIONS)]
        resp = client.chat.completions.create(
            model="ab:loop", messages=messages, max_tokens=6, temperature=1.0, user=f"u{i}"
        )
        arm = resp.model_extra["ab_arm"]
        assert resp.model == {"control": "base", "treat": "tuned"}[arm]
        served.append((resp.id, arm, resp.choices[0].message.content))
    assert {arm for _, arm, _ in served} == {"control", "treat"}

    # feedback for an id the server never gave: 404, nothing stored
    r = httpx.post(f"{url}/ab/feedback", json={"response_id": "chatcmpl-unknown", "rating": 1})
    assert r.status_code == 404 and r.json()["error"]["code"] == "response_not_found"
    r = httpx.post(f"{url}/ab/feedback", json={"response_id": served[0][0], "rating": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "rating"
    assert feedback_counts(server, "loop") == {"control": 0, "treat": 0}
    assert stored_feedback(server, "loop") == ""
    assert httpx.get(f"{url}/ab/splits/loop/kto.jsonl").status_code == 404

    # thumbs up for the tuned arm's answers, down for the base's; the first one changes its mind
    ratings = {rid: (1 if arm == "treat" else -1) for rid, arm, _ in served}
    first = served[0][0]
    r = httpx.post(f"{url}/ab/feedback", json={"response_id": first, "rating": -ratings[first]})
    assert r.status_code == 200, r.text
    for rid, rating in ratings.items():
        r = httpx.post(f"{url}/ab/feedback", json={"response_id": rid, "rating": rating})
        assert r.status_code == 200 and r.json()["split"] == "loop", r.text
    counts = feedback_counts(server, "loop")
    assert sum(counts.values()) == 13 and counts["treat"] > 0 and counts["control"] > 0

    # the export over HTTP: one line per rated answer, its latest rating, chat-shaped
    r = httpx.get(f"{url}/ab/splits/loop/kto.jsonl")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/jsonl")
    # an empty answer (the model stopped at once) teaches nothing: left out, and counted
    n_empty = sum(1 for _, _, text in served if not text.strip())
    assert r.headers["x-swapserve-left-out"] == str(n_empty)
    lines = [json.loads(x) for x in r.text.splitlines()]
    answers = {text: arm for _, arm, text in served}
    assert len(lines) == 12 - n_empty >= 8
    for line in lines:
        assert set(line) == {"prompt", "completion", "label"}
        assert isinstance(line["label"], bool)
        assert isinstance(line["prompt"], list) and line["prompt"][-1]["role"] == "user"
        (answer,) = line["completion"]  # one assistant message, as TRL concatenates lists
        assert answer["role"] == "assistant"
        assert line["label"] is (answers[answer["content"]] == "treat")
    prompts = [line["prompt"] for line in lines]
    assert CONVERSATIONS[0] in prompts  # the system prompt is kept
    assert [{"role": "system", "content": "Be terse."}, CONVERSATIONS[1][1]] in prompts
    assert [{"role": "user", "content": "Name a tree."}] in prompts

    # the CLI writes the same bytes
    assert swapserve(["ab", "export", "loop", "--format", "kto", "--out", str(out), "--server", url]) == 0  # fmt: skip
    assert f"{len(lines)} rated answers" in capsys.readouterr().err
    assert out.read_text() == r.text

    # what the trainer reads, and what TRL's KTO reads
    data = load_jsonl(out, task="kto")
    assert data.format == "unpaired" and len(data.examples) == len(lines)
    assert sorted(e.label for e in data.examples) == sorted(line["label"] for line in lines)
    datasets = pytest.importorskip("datasets")
    from transformers import AutoTokenizer
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    rows = datasets.load_dataset("json", data_files=str(out), split="train")
    assert is_conversational(rows[0])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    ensure_chat_template(tokenizer)  # the trainer's and server's template for this base
    for row, line in zip(rows, lines, strict=True):
        text = maybe_apply_chat_template(row, tokenizer)
        assert text["label"] is line["label"]
        # (the Gemma template trims each message)
        assert line["completion"][0]["content"].strip() in text["completion"]
        assert line["prompt"][-1]["content"] in text["prompt"]

    # train KTO on the exported file and register the adapter with the running server
    code = swapserve(
        ["train", "kto", "--data", str(out), "--name", "from-feedback",
         "--base", str(tiny_model_path), "--quantization", "none", "--device", "cpu",
         "--rank", "4", "--max-steps", "3", "--eval-fraction", "0", "--max-length", "128",
         "--output-dir", str(tmp_path / "from-feedback"), "--server", url]
    )  # fmt: skip
    assert code == 0
    card = json.loads((tmp_path / "from-feedback" / "swapserve_card.json").read_text())
    assert card["objective"] == "kto"
    assert card["data"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    r = httpx.get(f"{url}/adapters/from-feedback")
    assert r.status_code == 200, r.text
    resp = client.chat.completions.create(
        model="from-feedback", messages=CONVERSATIONS[0], max_tokens=6
    )
    assert resp.model == "from-feedback" and resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens > 0

    # and the next round: the new adapter as an arm against the one it learned from
    arms = [
        {"name": "tuned", "model": "tuned", "weight": 1},
        {"name": "kto", "model": "from-feedback", "weight": 1},
    ]
    assert httpx.post(f"{url}/ab/splits", json={"name": "round2", "arms": arms}).is_success
    seen = set()
    for i in range(8):
        resp = client.chat.completions.create(
            model="ab:round2", messages=CONVERSATIONS[0], max_tokens=4, user=f"r{i}"
        )
        seen.add((resp.model_extra["ab_arm"], resp.model))
    assert ("kto", "from-feedback") in seen


def test_export_leaves_out_what_the_trainer_refuses(server, tmp_path):
    """A conversation the server serves but the trainer cannot train on (a tool turn, two
    user turns in a row) is left out of the export with its reason, instead of making the
    trainer refuse the whole file; with nothing left, the export is a 404 saying why."""
    url = server.url
    arms = [{"name": "only", "model": "base", "weight": 1}]
    assert httpx.post(f"{url}/ab/splits", json={"name": "odd", "arms": arms}).is_success
    client = server.openai()
    tool_turn = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]  # fmt: skip
    two_users = [{"role": "user", "content": "Hi"}, {"role": "user", "content": "again"}]
    ids = []
    for messages in (tool_turn, two_users):
        resp = client.chat.completions.create(model="ab:odd", messages=messages, max_tokens=4)
        ids.append(resp.id)
        r = httpx.post(f"{url}/ab/feedback", json={"response_id": resp.id, "rating": 1})
        assert r.status_code == 200, r.text
    r = httpx.get(f"{url}/ab/splits/odd/kto.jsonl")
    assert r.status_code == 404, r.text
    err = r.json()["error"]
    assert err["code"] == "no_feedback"
    assert "2 left out" in err["message"] and ids[0] in err["message"]

    resp = client.chat.completions.create(model="ab:odd", messages=CONVERSATIONS[0], max_tokens=4)
    assert httpx.post(f"{url}/ab/feedback", json={"response_id": resp.id, "rating": -1}).is_success
    r = httpx.get(f"{url}/ab/splits/odd/kto.jsonl")
    assert r.status_code == 200 and r.headers["x-swapserve-left-out"] == "2"
    (line,) = [json.loads(x) for x in r.text.splitlines()]
    assert line["prompt"] == CONVERSATIONS[0] and line["label"] is False
    path = tmp_path / "kto.jsonl"
    path.write_text(r.text)
    assert len(load_jsonl(path, task="kto").examples) == 1


def test_completion_prompts_export_as_text(server, tmp_path):
    """A split's /v1/completions traffic: the prompt is the string the client sent and the
    completion the text after it (TRL's standard, not conversational, format)."""
    url = server.url
    arms = [{"name": "only", "model": "base", "weight": 1}]
    assert httpx.post(f"{url}/ab/splits", json={"name": "text", "arms": arms}).is_success
    client = server.openai()
    for rating in (1, -1):
        resp = client.completions.create(model="ab:text", prompt="Once upon a time", max_tokens=5)
        r = httpx.post(f"{url}/ab/feedback", json={"response_id": resp.id, "rating": rating})
        assert r.status_code == 200, r.text
    r = httpx.get(f"{url}/ab/splits/text/kto.jsonl")
    assert r.status_code == 200, r.text
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert [line["label"] for line in lines] == [True, False]
    assert all(line["prompt"] == "Once upon a time" for line in lines)
    assert all(isinstance(line["completion"], str) for line in lines)
    path = tmp_path / "kto.jsonl"
    path.write_text(r.text)
    assert len(load_jsonl(path, task="kto").examples) == 2
