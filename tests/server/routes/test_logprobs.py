"""Log probabilities and echo on the tiny model, through the real server and the `openai`
SDK, checked against a log-softmax of the model's own logits computed here, outside the
server (a plain transformers forward of the same folder)."""

from __future__ import annotations

import pytest
import torch

from tests.server.routes.test_openai import assert_error, post
from tests.support import load_causal_lm


@pytest.fixture(scope="module")
def reference(tiny_model_path):
    """token ids -> log-softmax of the logits at every position, (seq, vocab)."""
    model = load_causal_lm(tiny_model_path)

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            logits = model(torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)

    return logprobs


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    from trainer.base_model import ensure_chat_template

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    ensure_chat_template(tok)  # as the server's loader does
    return tok


def test_completion_logprobs_match_the_model(tiny_server, reference):
    prompt = [2, 40, 41, 42, 43]  # token ids: what is scored is exactly what is sent
    r = tiny_server.openai().completions.create(
        model="base", prompt=prompt, max_tokens=4, temperature=0, logprobs=3
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 4
    ids = list(prompt)
    for i in range(4):
        ref = reference(ids)[-1]
        best = int(torch.argmax(ref))  # greedy: the chosen token is the top one
        assert lp.token_logprobs[i] == pytest.approx(float(ref[best]), abs=1e-4)
        top = sorted(lp.top_logprobs[i].values(), reverse=True)
        assert top[:3] == pytest.approx(torch.topk(ref, 3).values.tolist(), abs=1e-4)
        ids.append(best)
    assert lp.text_offset[0] == 0
    if not any(t.startswith("bytes:") for t in lp.tokens):  # whole characters only
        assert "".join(lp.tokens) == r.choices[0].text


def test_echo_returns_the_prompt_logprobs(tiny_server, reference):
    """What lm-evaluation-harness sends for loglikelihood: echo, max_tokens 0 or 1."""
    prompt = [2, 50, 60, 70, 80, 90]
    ref = reference(prompt)
    for max_tokens in (0, 1):
        r = tiny_server.openai().completions.create(
            model="base", prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=1, echo=True
        )
        lp = r.choices[0].logprobs
        assert len(lp.token_logprobs) == len(prompt) + max_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for i in range(1, len(prompt)):
            assert lp.token_logprobs[i] == pytest.approx(float(ref[i - 1, prompt[i]]), abs=1e-4)
            assert max(lp.top_logprobs[i].values()) == pytest.approx(
                float(ref[i - 1].max()), abs=1e-4
            )
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == max_tokens


def test_echo_text_and_streaming(tiny_server):
    client = tiny_server.openai()
    kwargs = dict(model="base", prompt="Hello world", max_tokens=3, temperature=0)
    plain = client.completions.create(**kwargs)
    echoed = client.completions.create(**kwargs, echo=True)
    assert echoed.choices[0].text == "Hello world" + plain.choices[0].text
    whole = client.completions.create(**kwargs, echo=True, logprobs=2)
    chunks = [c for c in client.completions.create(**kwargs, echo=True, logprobs=2, stream=True)]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    streamed = [
        x
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for x in c.choices[0].logprobs.token_logprobs
    ]
    expected = whole.choices[0].logprobs.token_logprobs
    assert streamed[0] is None and expected[0] is None
    assert streamed[1:] == pytest.approx(expected[1:], abs=1e-6)


def test_chat_logprobs_and_top_logprobs(tiny_server, reference, tokenizer):
    client = tiny_server.openai()
    messages = [{"role": "user", "content": "Hello world"}]
    r = client.chat.completions.create(
        model="base", messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=5
    )
    content = r.choices[0].logprobs.content
    assert content and len(content) == r.usage.completion_tokens
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    bos = tokenizer.bos_token
    ids = tokenizer(text, add_special_tokens=not text.startswith(bos))["input_ids"]
    for entry in content:
        ref = reference(ids)[-1]
        assert len(entry.top_logprobs) == 5
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            torch.topk(ref, 5).values.tolist(), abs=1e-4
        )
        assert entry.logprob == pytest.approx(float(ref.max()), abs=1e-4)
        assert entry.bytes and (
            entry.token.startswith("bytes:") or bytes(entry.bytes).decode() == entry.token
        )
        ids.append(int(torch.argmax(ref)))
    # streamed: the same entries, chunk by chunk
    chunks = list(
        client.chat.completions.create(
            model="base",
            messages=messages,
            max_tokens=4,
            temperature=0,
            logprobs=True,
            top_logprobs=5,
            stream=True,
        )
    )
    streamed = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [
        (e.token, round(e.logprob, 5)) for e in content
    ]


def test_constrained_logprobs_list_only_allowed_tokens(tiny_server):
    r = tiny_server.openai().chat.completions.create(
        model="base",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
        response_format={"type": "json_object"},
    )
    first = r.choices[0].logprobs.content[0]
    assert first.token == "{" and first.logprob == pytest.approx(0.0)
    assert [t.token for t in first.top_logprobs] == ["{"]


def test_logit_bias_forces_a_token(tiny_server, tokenizer):
    token = tokenizer.convert_tokens_to_ids("!")
    r = tiny_server.openai().completions.create(
        model="base", prompt="Hello", max_tokens=3, temperature=0, logit_bias={str(token): 100}
    )
    assert r.choices[0].text == "!!!"


@pytest.mark.parametrize(
    "path, extra, param",
    [
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/completions", {"logprobs": 21}, "logprobs"),
        ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"logit_bias": {"99999": 1}}, "logit_bias"),
        ("/v1/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
        ("/v1/chat/completions", {"logit_bias": {"abc": 1}}, "logit_bias"),
    ],
)
def test_bad_logprob_inputs_are_400(tiny_server, path, extra, param):
    body = {"messages": [{"role": "user", "content": "x"}]} if "chat" in path else {"prompt": "x"}
    r = post(tiny_server, path, {"model": "base", **body, **extra})
    assert_error(r, 400, param)
