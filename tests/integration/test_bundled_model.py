"""The bundled Gemma 3 270M, 4-bit, behind the real server, driven by the `openai` SDK."""

from __future__ import annotations

import re

import httpx
import pytest

pytestmark = pytest.mark.integration


def words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]{2,}", text)


def test_ready_reports_a_4bit_model_well_under_fp32(bundled_server):
    ready = httpx.get(f"{bundled_server.url}/ready").json()
    assert ready["model"] == "gemma-3-270m"
    # loaded in NF4, re-packed at load for the CPU fast path (the default on a CPU)
    assert ready["runner"] == "fast"
    assert ready["quantization"] == "int4"
    assert ready["weights_format"]["linear"].startswith("int4")
    assert ready["weights_format"]["embedding"] == "shares the int8 output table"  # 63 %
    assert "screened" in ready["weights_format"]["output_layer"]
    assert ready["num_parameters"] > 200_000_000
    # int4 linear layers + one int8 output/embedding table: well under the float32 size
    assert ready["weights_bytes"] < 0.6 * ready["fp32_weights_bytes"]


def test_completion_is_coherent_text(bundled_server):
    client = bundled_server.openai()
    r = client.completions.create(
        model="base", prompt="The capital of France is", max_tokens=12, temperature=0
    )
    text = r.choices[0].text
    assert len(words(text)) >= 3, text
    assert r.usage.completion_tokens <= 12


def test_chat_streamed_and_not_agree(bundled_server):
    client = bundled_server.openai()
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    whole = client.chat.completions.create(
        model="base", messages=messages, max_tokens=10, temperature=0
    )
    assert whole.choices[0].message.content
    assert whole.usage.prompt_tokens > 5
    stream = client.chat.completions.create(
        model="base",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_bad_input_on_the_real_model(bundled_server):
    client = bundled_server.openai()
    import openai

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="base", prompt="hello " * 5000, max_tokens=5)
    assert info.value.body["code"] == "context_length_exceeded"
