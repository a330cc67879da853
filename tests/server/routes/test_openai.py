"""The OpenAI routes on the tiny model, through the real server and the real `openai` SDK."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

CHAT = [{"role": "user", "content": "Hello world"}]


def test_chat_completion_shape(tiny_server):
    client = tiny_server.openai()
    r = client.chat.completions.create(model="base", messages=CHAT, max_tokens=5, temperature=0)
    assert r.object == "chat.completion"
    assert r.model == "base"
    assert r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 5


def test_max_completion_tokens_is_honoured(tiny_server):
    client = tiny_server.openai()
    r = client.chat.completions.create(
        model="base",
        messages=CHAT,
        max_completion_tokens=3,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3


def test_streaming_chat_matches_non_streaming(tiny_server):
    client = tiny_server.openai()
    kwargs = dict(model="base", messages=CHAT, max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert text == whole.choices[0].message.content
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_stream_without_include_usage_has_no_usage_chunk(tiny_server):
    client = tiny_server.openai()
    chunks = list(
        client.chat.completions.create(model="base", messages=CHAT, max_tokens=3, stream=True)
    )
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)


def test_completions_plain_streamed_and_batched(tiny_server):
    client = tiny_server.openai()
    r = client.completions.create(
        model="base", prompt="The quick brown", max_tokens=6, temperature=0
    )
    assert r.object == "text_completion"
    streamed = list(
        client.completions.create(
            model="base", prompt="The quick brown", max_tokens=6, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    two = client.completions.create(
        model="base", prompt=["The quick brown", "Hello"], max_tokens=4, temperature=0
    )
    assert sorted(c.index for c in two.choices) == [0, 1]
    first = next(c for c in two.choices if c.index == 0)
    assert r.choices[0].text.startswith(first.text) or first.finish_reason == "stop"


def test_n_seed_and_stop(tiny_server):
    client = tiny_server.openai()
    kwargs = dict(model="base", messages=CHAT, max_tokens=8, temperature=1.0, seed=3, n=3)
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    full = (
        client.completions.create(
            model="base",
            prompt="Hello",
            max_tokens=12,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .text
    )
    stop = full[2:4]
    cut = client.completions.create(
        model="base", prompt="Hello", max_tokens=12, temperature=0, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full[: full.index(stop)]


def test_models_lists_base(tiny_server):
    models = tiny_server.openai().models.list()
    ids = [m.id for m in models.data]
    assert ids[0] == "base"


def test_health_ready_metrics(tiny_server):
    assert httpx.get(f"{tiny_server.url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{tiny_server.url}/ready").json()
    assert ready["status"] == "ready"
    assert ready["weights_bytes"] > 0
    tiny_server.openai().chat.completions.create(model="base", messages=CHAT, max_tokens=2)
    text = httpx.get(f"{tiny_server.url}/metrics").text
    assert 'swapserve_requests_total{endpoint="chat",model="base",outcome="ok"}' in text
    assert "swapserve_time_to_first_token_seconds_bucket" in text
    assert "swapserve_engine_queue_depth" in text


# --- bad input: the OpenAI error shape and the right status ---------------------------------


def assert_error(response: httpx.Response, status: int, param: str | None = None, code=None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


def post(server, path, payload=None, **kwargs):
    if payload is not None:
        kwargs["json"] = payload
    return httpx.post(f"{server.url}{path}", timeout=30, **kwargs)


def test_malformed_json_is_400(tiny_server):
    r = post(
        tiny_server,
        "/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    err = assert_error(r, 400)
    assert "JSON" in err["message"]


@pytest.mark.parametrize(
    "payload, param",
    [
        ({"messages": CHAT}, "model"),
        ({"model": "base"}, "messages"),
        ({"model": "base", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"model": "base", "messages": CHAT, "temperature": 3}, "temperature"),
        ({"model": "base", "messages": CHAT, "top_p": 0}, "top_p"),
        ({"model": "base", "messages": CHAT, "n": 0}, "n"),
        ({"model": "base", "messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "base", "messages": CHAT, "presence_penalty": 5}, "presence_penalty"),
        ({"model": "base", "messages": "hello"}, "messages"),
    ],
)
def test_schema_errors_are_400(tiny_server, payload, param):
    r = post(tiny_server, "/v1/chat/completions", payload)
    err = assert_error(r, 400)
    assert err["param"].startswith(param)


def test_unknown_model_is_404_with_param_model(tiny_server):
    with pytest.raises(openai.NotFoundError) as info:
        tiny_server.openai().chat.completions.create(model="no-such-adapter", messages=CHAT)
    assert info.value.body["param"] == "model"
    assert info.value.body["code"] == "model_not_found"
    r = post(tiny_server, "/v1/completions", {"model": "nope", "prompt": "x"})
    assert_error(r, 404, "model", "model_not_found")


def test_empty_messages_is_400(tiny_server):
    r = post(tiny_server, "/v1/chat/completions", {"model": "base", "messages": []})
    assert_error(r, 400, "messages")


@pytest.mark.parametrize("prompt", [[5, 10**6], [-1], [[3, 4], [7, 400000]]])
def test_token_ids_outside_the_vocabulary_are_400(tiny_server, prompt):
    # found by the API fuzzer: these reached the embedding layer, raised there, and the
    # scheduler failed every request in the same batch with a 500
    r = post(tiny_server, "/v1/completions", {"model": "base", "prompt": prompt, "max_tokens": 2})
    assert "vocabulary" in assert_error(r, 400, "prompt")["message"]
    ok = post(tiny_server, "/v1/completions", {"model": "base", "prompt": [5, 6], "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def test_prompt_longer_than_context_is_400(tiny_server):
    long = "The quick brown fox jumps over the lazy dog. " * 200
    r = post(
        tiny_server,
        "/v1/chat/completions",
        {"model": "base", "messages": [{"role": "user", "content": long}]},
    )
    assert_error(r, 400, "messages", "context_length_exceeded")
    r = post(tiny_server, "/v1/completions", {"model": "base", "prompt": long})
    assert_error(r, 400, "prompt", "context_length_exceeded")
    with pytest.raises(openai.BadRequestError) as info:
        tiny_server.openai().completions.create(model="base", prompt=long)
    assert info.value.body["code"] == "context_length_exceeded"


@pytest.mark.parametrize("max_tokens", [0, -5, 100000])
def test_max_tokens_out_of_range_is_400(tiny_server, max_tokens):
    r = post(
        tiny_server,
        "/v1/chat/completions",
        {"model": "base", "messages": CHAT, "max_tokens": max_tokens},
    )
    assert_error(r, 400, "max_tokens")


def test_body_over_limit_is_413(tiny_server):
    big = {"model": "base", "messages": [{"role": "user", "content": "x" * 100_000}]}
    r = post(tiny_server, "/v1/chat/completions", big)
    assert_error(r, 413, code="body_too_large")

    # a client that lies about the length (chunked upload) is cut off too
    def chunks():
        yield b'{"model": "base", "messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"y" * 1024
        yield b'"}]}'

    r = post(
        tiny_server,
        "/v1/chat/completions",
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    assert_error(r, 413, code="body_too_large")


def test_unsupported_options_are_400_not_ignored(tiny_server):
    r = post(tiny_server, "/v1/completions", {"model": "base", "prompt": "x", "suffix": "y"})
    assert_error(r, 400, "suffix")
    r = post(
        tiny_server,
        "/v1/chat/completions",
        {
            "model": "base",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://x"}}],
                }
            ],
        },
    )
    assert "'image_url'" in assert_error(r, 400, "messages.0.content")["message"]
    text_part = {"role": "user", "content": [{"type": "text"}]}  # no text
    r = post(tiny_server, "/v1/chat/completions", {"model": "base", "messages": [text_part]})
    assert "'text'" in assert_error(r, 400, "messages.0.content")["message"]


def test_unknown_fields_are_accepted(tiny_server):
    r = post(
        tiny_server,
        "/v1/chat/completions",
        {"model": "base", "messages": CHAT, "max_tokens": 2, "some_future_field": 1},
    )
    assert r.status_code == 200


def test_unknown_route_has_the_error_shape(tiny_server):
    r = httpx.get(f"{tiny_server.url}/v1/nothing-here")
    assert_error(r, 404)


def test_client_disconnect_mid_stream_stops_generation(tiny_server):
    engine = tiny_server.app.state.engine
    stats = engine.scheduler.stats
    real_decode = engine.runner.decode

    def slow_decode(*args, **kwargs):  # keep the row alive long enough to hang up on it
        time.sleep(0.02)
        return real_decode(*args, **kwargs)

    engine.runner.decode = slow_decode
    try:
        before = stats.requests_cancelled
        payload = {
            "model": "base",
            "messages": CHAT,
            "max_tokens": 200,
            "stream": True,
            "extra": 1,
            "ignore_eos": True,
        }
        with httpx.stream(
            "POST", f"{tiny_server.url}/v1/chat/completions", json=payload, timeout=30
        ) as r:
            lines = r.iter_lines()
            got = 0
            for line in lines:
                if line.startswith("data: {"):
                    json.loads(line[6:])
                    got += 1
                if got >= 3:
                    break
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and stats.requests_cancelled == before:
            time.sleep(0.05)
        assert stats.requests_cancelled == before + 1
        time.sleep(0.1)  # one more loop turn publishes the batch size
        assert stats.running == 0
    finally:
        engine.runner.decode = real_decode


def test_full_queue_is_429_with_retry_after(tiny_model_path, tmp_path):
    from tests.support import start_live_server

    server = start_live_server(
        base_model=str(tiny_model_path),
        quantization="none",
        max_model_len=256,
        default_max_tokens=16,
        max_num_seqs=1,
        max_queue=0,
        data_dir=tmp_path,
    )
    engine = server.app.state.engine
    real_decode = engine.runner.decode

    def slow_decode(*args, **kwargs):
        time.sleep(0.05)
        return real_decode(*args, **kwargs)

    engine.runner.decode = slow_decode
    try:
        payload = {
            "model": "base",
            "messages": CHAT,
            "max_tokens": 100,
            "stream": True,
            "ignore_eos": True,
        }
        with httpx.stream(
            "POST", f"{server.url}/v1/chat/completions", json=payload, timeout=30
        ) as r:
            lines = r.iter_lines()  # held open: closing it would hang up on the server
            next(lines)
            deadline = time.monotonic() + 10
            while engine.scheduler.stats.running == 0 and time.monotonic() < deadline:
                time.sleep(0.01)  # until the only row is taken
            assert engine.scheduler.stats.running == 1
            busy = post(
                server, "/v1/chat/completions", {"model": "base", "messages": CHAT, "max_tokens": 2}
            )
            assert_error(busy, 429, code="queue_full")
            assert int(busy.headers["retry-after"]) >= 1
            with pytest.raises(openai.RateLimitError):
                server.openai().chat.completions.create(model="base", messages=CHAT, max_tokens=2)
            lines.close()
    finally:
        engine.runner.decode = real_decode
        server.stop()
