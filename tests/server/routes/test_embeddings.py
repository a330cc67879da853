"""/v1/embeddings through the real server and the real `openai` SDK: the RAG embedder's own
vectors (the bundled all-MiniLM-L6-v2), in both encodings, from text or token arrays; and
every request it cannot honour refused by name."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest

from tests.support import start_live_server
from tests.tiny_model import build_lora_adapter

MODEL = "all-MiniLM-L6-v2"
TEXTS = [
    "The Zorblax-7 reactor runs on frozen lemonade.",
    "Paris is the capital of France.",
    "hi",
]


@pytest.fixture(scope="module")
def server(tiny_model_path, tmp_path_factory):
    server = start_live_server(
        base_model=str(tiny_model_path),
        quantization="none",
        max_model_len=256,
        default_max_tokens=8,
        data_dir=tmp_path_factory.mktemp("embeddings-data"),
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def embedder():
    """The very embedder RAG uses (one per process: the live server shares it)."""
    from rag.embeddings import get_embedder

    return get_embedder()


def post(server, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=120)


def refused(r: httpx.Response, status: int, param: str | None, code: str | None = None) -> str:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error["message"]


def test_sdk_gets_the_embedders_own_vectors_in_both_encodings(server, embedder):
    import json

    sent: list[str] = []  # encoding_format of each request the SDK sends

    def record(request: httpx.Request) -> None:
        sent.append(json.loads(request.content).get("encoding_format"))

    client = server.openai(http_client=httpx.Client(event_hooks={"request": [record]}))
    expected = embedder.embed(TEXTS)  # what a RAG collection stores for these texts
    tokens = sum(embedder.input_length(t) for t in TEXTS)
    # left out, the SDK asks for base64 and decodes it to floats itself; asked for,
    # base64 comes back as the strings
    for fmt in (openai.NOT_GIVEN, "float", "base64"):
        r = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format=fmt)
        assert r.model == MODEL and r.object == "list"
        assert [d.index for d in r.data] == [0, 1, 2]
        if fmt == "base64":
            rows = [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in r.data]
        else:
            rows = [d.embedding for d in r.data]
        got = np.array(rows, dtype=np.float32)
        assert got.shape == (3, 384)
        np.testing.assert_array_equal(got, expected)  # float32 values, bit for bit
        assert r.usage.prompt_tokens == r.usage.total_tokens == tokens
    assert sent == ["base64", "float", "base64"]
    np.testing.assert_allclose(np.linalg.norm(expected, axis=1), 1.0, rtol=1e-5)
    floats = post(server, model=MODEL, input="hi").json()  # OpenAI's default: float
    alone = embedder.embed(["hi"])[0]  # alone, not padded in a batch: its own rounding
    assert floats["data"][0]["embedding"] == [float(x) for x in alone]
    assert floats["data"][0]["object"] == "embedding"


def test_token_arrays_are_the_embedders_own_ids(server, embedder):
    client = server.openai()
    expected = embedder.embed(TEXTS[:2])
    ids = [embedder.token_ids(t) for t in TEXTS[:2]]
    both = client.embeddings.create(model=MODEL, input=ids)
    one = client.embeddings.create(model=MODEL, input=ids[0])  # a single token array
    got = np.array([d.embedding for d in both.data], dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(np.array(one.data[0].embedding), expected[0], atol=1e-5)
    # the same tokens are counted as for the text (the model's [CLS] and [SEP] included)
    text = client.embeddings.create(model=MODEL, input=TEXTS[:2])
    assert both.usage.prompt_tokens == text.usage.prompt_tokens


def test_models_lists_the_embedder_as_an_embedding_model(server):
    cards = {m["id"]: m for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
    assert cards[MODEL]["task"] == "embed"
    assert cards["base"]["task"] == "generate"
    listed = {m.id: m for m in server.openai().models.list().data}
    assert listed[MODEL].model_extra["task"] == "embed"


def test_what_cannot_be_honoured_is_refused_by_name(server, embedder, tiny_model_path, tmp_path):
    adapter = build_lora_adapter(tiny_model_path, tmp_path / "style", seed=3)
    r = httpx.post(f"{server.url}/adapters", json={"name": "style", "path": str(adapter)})
    assert r.status_code == 201, r.text
    client = server.openai()

    # models that generate cannot embed; an unknown model is not found
    for model in ("base", "style"):
        with pytest.raises(openai.BadRequestError) as info:
            client.embeddings.create(model=model, input="hello")
        assert info.value.body["code"] == "model_cannot_embed"
        assert info.value.body["param"] == "model"
        assert MODEL in info.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="hello")
    # and the embedder cannot generate
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert info.value.body["code"] == "model_cannot_generate"

    # dimensions: only the native size
    refused(post(server, model=MODEL, input="hi", dimensions=128), 400, "dimensions")
    assert post(server, model=MODEL, input="hi", dimensions=384).status_code == 200
    # encodings OpenAI does not define
    refused(post(server, model=MODEL, input="hi", encoding_format="int8"), 400, "encoding_format")
    # empty inputs, too many inputs
    for bad in ("", [], ["fine", ""], [[]]):
        refused(post(server, model=MODEL, input=bad), 400, "input")
    refused(post(server, model=MODEL, input=["x"] * 2049), 400, "input")
    # longer than the model reads: refused, never cut silently
    long = "lemonade " * 300
    assert embedder.input_length(long) > embedder.max_seq_length
    message = refused(
        post(server, model=MODEL, input=["short", long]), 400, "input", "context_length_exceeded"
    )
    assert "input[1]" in message and str(embedder.max_seq_length) in message
    # token ids outside the embedder's vocabulary (e.g. tiktoken's)
    message = refused(post(server, model=MODEL, input=[101, 10**6]), 400, "input")
    assert "tiktoken" in message and "30522" in message
    refused(post(server, model=MODEL, input=[[101], [-1]]), 400, "input")
    too_long_ids = [1000] * embedder.max_seq_length  # + [CLS] and [SEP]
    refused(post(server, model=MODEL, input=too_long_ids), 400, "input", "context_length_exceeded")
    # a mix of strings and token ids is not one of OpenAI's input types
    refused(post(server, model=MODEL, input=["text", 101]), 400, "input")
