"""Retrieval end to end on the bundled Gemma 3 270M: a user loads a folder of Markdown
notes (facts no model knows), asks through the `openai` client with `rag`, and gets an
answer with citations; the same with an adapter; the collection survives a restart."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from loadtests._adapters import linear_shapes_from_config, random_lora_adapter
from tests.integration.conftest import ServerProcess

pytestmark = pytest.mark.integration

NOTES = {
    "zorblax.md": "# The Zorblax-7 reactor\n\nThe Zorblax-7 reactor runs on frozen lemonade. "
    "It was built in 2091 on the island of Pelmora.",
    "quibble.md": "# Quibble birds\n\nQuibble birds migrate to the moon every leap year and "
    "return with silver feathers.",
    "mizzle.md": "# Mizzle cheese\n\nMizzle cheese is aged inside hollow volcanoes for "
    "exactly seven weeks.",
}
QUESTION = [{"role": "user", "content": "What does the Zorblax-7 reactor run on?"}]


def ingest_folder(url: str, name: str, folder: Path) -> dict:
    r = httpx.post(f"{url}/rag/collections", json={"name": name}, timeout=60)
    assert r.status_code == 201, r.text
    files = [
        ("files", (p.name, p.read_bytes(), "text/markdown")) for p in sorted(folder.glob("*.md"))
    ]
    # The first RAG request loads the embedding model in the server: allow for it.
    r = httpx.post(f"{url}/rag/collections/{name}/documents", files=files, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def notes(bundled_server, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("notes")
    for name, text in NOTES.items():
        (folder / name).write_text(text)
    result = ingest_folder(bundled_server.url, "notes", folder)
    assert result["added"] == 3 and result["documents"] == 3
    return "notes"


def ask(server, model: str, collection: str, **kwargs):
    return server.openai().chat.completions.create(
        model=model,
        messages=QUESTION,
        max_tokens=8,
        temperature=0,
        extra_body={"rag": {"collection": collection, "top_k": 2}},
        **kwargs,
    )


def test_answer_cites_the_right_note(bundled_server, notes):
    r = ask(bundled_server, "base", notes)
    cites = r.model_extra["citations"]
    assert cites[0]["doc_id"] == "zorblax.md"
    assert "frozen lemonade" in cites[0]["snippet"]
    assert r.choices[0].message.content.strip()
    plain = bundled_server.openai().chat.completions.create(
        model="base", messages=QUESTION, max_tokens=1
    )
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 30

    stream = ask(bundled_server, "base", notes, stream=True)
    chunks = list(stream)
    assert chunks[0].model_extra["citations"] == cites
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content


def test_rag_with_an_adapter(bundled_server, notes, tmp_path):
    from tests.integration.conftest import GEMMA
    from trainer.base_model import resolve_base_model

    config = json.loads((resolve_base_model(GEMMA) / "config.json").read_text())
    # A tiny scale: the adapter changes the weights without drowning the model's language.
    path = random_lora_adapter(
        tmp_path / "styled", linear_shapes_from_config(config), r=8, scale=0.001
    )
    r = httpx.post(
        f"{bundled_server.url}/adapters", json={"name": "styled", "path": str(path)}, timeout=120
    )
    assert r.status_code == 201, r.text
    answer = ask(bundled_server, "styled", notes)
    assert answer.model == "styled"
    assert answer.model_extra["citations"][0]["doc_id"] == "zorblax.md"
    assert answer.choices[0].message.content.strip()


def test_collection_survives_a_restart(bundled_server, notes, tmp_path):
    second = ServerProcess(bundled_server.env, tmp_path / "second.log")
    try:
        second.wait_ready()
        listed = httpx.get(f"{second.url}/rag/collections").json()["data"]
        assert {c["id"]: c["documents"] for c in listed}["notes"] == 3
        r = httpx.post(
            f"{second.url}/rag/collections/notes/search",
            json={"query": "Which cheese is aged in volcanoes?", "top_k": 1},
            timeout=300,
        )
        assert r.status_code == 200, r.text
        assert r.json()["data"][0]["doc_id"] == "mizzle.md"
    finally:
        second.stop()
