"""One engine suite, run against every engine present (PEFT's testing_common habit).

Each engine serves the same tiny random model as the real server, `swapserve serve` in a
process of its own, driven over HTTP by the real `openai` SDK: generation, stop and length,
several adapters in one batch each matching its solo run, load/unload while requests run,
unknown adapter 404, a client that disconnects frees its slot, a trained token row
served or refused, logprobs and echo against the model's own logits, structured outputs and
forced tool calls that validate, logit_bias, and shutdown drains. The `hf` engine always runs; the `vllm` engine
runs where its environment is (`make vllm-env` builds .venv-vllm; SWAPSERVE_VLLM_PYTHON
names another interpreter), with a tensor-parallel check besides.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support import ServerProcess
from tests.tiny_model import build_lora_adapter, build_tiny_model

ROOT = Path(__file__).resolve().parents[3]
PROMPTS = [
    "Hello world, this is",
    "The quick brown fox jumps over the lazy dog. What is",
    "One base model, many",
    "Adapters change behaviour; retrieval brings",
]
# vLLM's CPU attention takes head sizes from 32 up; the hf engine takes any
HEAD_DIM = 32
VLLM_START_S = 900  # three processes import vLLM on a busy 2-core machine
# a vLLM server start (several processes, each importing vLLM) counts against the first
# test that needs it, and the tensor-parallel test starts a second one
pytestmark = pytest.mark.timeout(2 * VLLM_START_S)


def vllm_python() -> str | None:
    """The interpreter of the vLLM environment, if there is one with vLLM in it."""
    python = os.environ.get("SWAPSERVE_VLLM_PYTHON") or str(ROOT / ".venv-vllm/bin/python")
    if not Path(python).is_file():
        return None
    probe = subprocess.run(
        [python, "-c", "import importlib.util as u; print(bool(u.find_spec('vllm')))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return python if probe.stdout.strip() == "True" else None


def engine_env(engine: str) -> dict[str, str]:
    env = {
        "SWAPSERVE_ENGINE": engine,
        "SWAPSERVE_MAX_MODEL_LEN": "512",
        "SWAPSERVE_DEFAULT_MAX_TOKENS": "16",
        "SWAPSERVE_MAX_LORA_RANK": "8",
        "SWAPSERVE_MAX_LORAS": "4",
        "SWAPSERVE_MAX_CPU_LORAS": "8",
        "SWAPSERVE_MAX_NUM_SEQS": "8",
        "SWAPSERVE_SHUTDOWN_GRACE_S": "60",
    }
    if engine == "vllm":
        env["SWAPSERVE_KV_CACHE_GIB"] = "0.25"
    return env


def start_server(engine: str, model: Path, data_dir: Path, **extra_env: str) -> ServerProcess:
    argv = None
    if engine == "vllm":
        python = vllm_python()
        if python is None:
            pytest.skip("no vLLM environment (make vllm-env builds .venv-vllm)")
        argv = [python, "-m", "server.cli"]
    env = {**engine_env(engine), **extra_env}
    server = ServerProcess(model, data_dir, env=env, argv=argv)
    return server.start(timeout_s=VLLM_START_S if engine == "vllm" else 300)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("suite-model"), head_dim=HEAD_DIM)


@pytest.fixture(scope="module")
def adapter_dirs(model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("suite-adapters")
    dirs = {
        f"a{i}": build_lora_adapter(model, root / f"a{i}", r=r, seed=10 + i)
        for i, r in enumerate((4, 8, 4, 8))
    }
    dirs["attn"] = build_lora_adapter(
        model, root / "attn", r=4, seed=20, target_modules=["q_proj", "v_proj"]
    )
    dirs["rows"] = build_lora_adapter(
        model, root / "rows", r=4, seed=21, trainable_token_indices=[5]
    )
    return dirs


@pytest.fixture(scope="module", params=["hf", "vllm"])
def server(request, model, tmp_path_factory) -> Iterator[tuple[str, ServerProcess]]:
    engine = request.param
    srv = start_server(engine, model, tmp_path_factory.mktemp(f"suite-{engine}"))
    try:
        yield engine, srv
    finally:
        srv.stop()


def register(srv: ServerProcess, name: str, path: Path) -> httpx.Response:
    return httpx.post(f"{srv.url}/adapters", json={"name": name, "path": str(path)}, timeout=120)


def greedy(srv: ServerProcess, model: str, prompt: str, max_tokens: int = 8) -> str:
    r = srv.openai().completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == max_tokens
    return r.choices[0].text


def gauge(srv: ServerProcess, name: str) -> float:
    text = httpx.get(f"{srv.url}/metrics", timeout=10).text
    match = re.search(rf"^swapserve_engine_{name} (\S+)$", text, re.M)
    assert match, f"no swapserve_engine_{name} in /metrics"
    return float(match.group(1))


# --- the suite, in order: the last test shuts the server down -------------------------------


def test_ready_names_the_engine(server):
    engine, srv = server
    ready = httpx.get(f"{srv.url}/ready", timeout=10).json()
    assert ready["status"] == "ready" and ready["engine"] == engine
    assert ready["device"] == "cpu" and ready["quantization"] == "none"


def test_generation_length_and_stop(server):
    _, srv = server
    client = srv.openai()
    text = greedy(srv, "base", PROMPTS[0], max_tokens=12)
    assert text and greedy(srv, "base", PROMPTS[0], max_tokens=12) == text  # deterministic
    # a stop string taken from the middle of the greedy answer ends it there, unreturned
    stop = text[len(text) // 2 :][:3]
    assert stop.strip(), text
    r = client.completions.create(
        model="base", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop]
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[: text.index(stop)]
    # chat: streamed deltas add up to the non-streamed answer; usage is counted
    messages = [{"role": "user", "content": PROMPTS[1]}]
    whole = client.chat.completions.create(
        model="base", messages=messages, max_tokens=6, temperature=0
    )
    chunks = client.chat.completions.create(
        model="base",
        messages=messages,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    streamed, usage = "", None
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].delta.content:
            streamed += chunk.choices[0].delta.content
        usage = chunk.usage or usage
    assert streamed == whole.choices[0].message.content
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    # n choices with a seed: reproducible
    seeded = [
        [
            c.text
            for c in client.completions.create(
                model="base", prompt=PROMPTS[2], max_tokens=6, n=3, seed=7, temperature=1.0
            ).choices
        ]
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1] and len(seeded[0]) == 3


def test_adapters_in_one_batch_match_their_solo_runs(server, adapter_dirs):
    _, srv = server
    for name in ("a0", "a1", "a2", "attn"):
        r = register(srv, name, adapter_dirs[name])
        assert r.status_code == 201, r.text
    models = ["base", "a0", "a1", "a2", "attn", "base"]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(models))]
    solo = [greedy(srv, m, p) for m, p in zip(models, prompts, strict=True)]
    with ThreadPoolExecutor(len(models)) as pool:
        together = list(pool.map(lambda mp: greedy(srv, *mp), zip(models, prompts, strict=True)))
    assert together == solo
    # the adapters change the output; the same prompt on base and on an adapter differ
    assert greedy(srv, "a0", PROMPTS[0]) != greedy(srv, "base", PROMPTS[0])
    listed = {m.id for m in srv.openai().models.list().data}
    assert {"base", "a0", "a1", "a2", "attn"} <= listed


def test_unknown_adapter_is_404(server):
    _, srv = server
    r = httpx.post(
        f"{srv.url}/v1/completions",
        json={"model": "no-such-adapter", "prompt": "hi", "max_tokens": 2},
        timeout=30,
    )
    assert r.status_code == 404
    assert r.json()["error"]["param"] == "model"


def test_load_and_unload_while_requests_run(server, adapter_dirs):
    engine, srv = server
    before = greedy(srv, "a0", PROMPTS[3], max_tokens=24)
    results: dict[str, str] = {}

    def long_stream() -> None:
        results["a0"] = greedy(srv, "a0", PROMPTS[3], max_tokens=24)

    runner = threading.Thread(target=long_stream)
    runner.start()
    r = register(srv, "a3", adapter_dirs["a3"])
    assert r.status_code == 201, r.text
    assert httpx.delete(f"{srv.url}/adapters/a1", timeout=60).status_code == 200
    runner.join(120)
    assert results["a0"] == before  # undisturbed by the load and the unload beside it
    assert greedy(srv, "a3", PROMPTS[0])
    r = httpx.post(
        f"{srv.url}/v1/completions",
        json={"model": "a1", "prompt": "hi", "max_tokens": 2},
        timeout=30,
    )
    assert r.status_code == 404


def test_trained_token_rows_are_served_or_refused_saying_why(server, adapter_dirs):
    engine, srv = server
    r = register(srv, "rows", adapter_dirs["rows"])
    if engine == "hf":
        assert r.status_code == 201, r.text
        assert r.json()["trained_tokens"] == [5]
    else:  # vLLM has no per-row embedding rows: refused, never served without them
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "unsupported_adapter"
        assert "token rows" in error["message"]
        assert "rows" not in {m.id for m in srv.openai().models.list().data}


def test_a_training_job_registers_its_adapter_live(server):
    """The trainer (transformers + PEFT, in the server's environment) trains; its adapter
    is registered and served by name, on either engine."""
    from tests.trainer.helpers import QA, house

    engine, srv = server
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": house(a)}]}
        for q, a in QA
    ]
    config = {"r": 4, "learning_rate": 1e-2, "max_steps": 2, "batch_size": 4}
    config |= {"max_length": 128, "eval_fraction": 0.0, "device": "cpu"}
    if engine == "vllm":  # trained token rows cannot be served there: refused before training
        r = httpx.post(
            f"{srv.url}/train/sft",
            json={"name": "t", "data": rows, "config": {**config, "trainable_tokens": "auto"}},
            timeout=60,
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "config.trainable_tokens"
    r = httpx.post(
        f"{srv.url}/train/sft", json={"name": "trained", "data": rows, "config": config}, timeout=60
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        record = httpx.get(f"{srv.url}/train/jobs/{job_id}", timeout=30).json()
        if record["state"] != "succeeded" and record["state"] in ("failed", "cancelled"):
            pytest.fail(f"training failed: {record}")
        if record["state"] == "succeeded" and record.get("notified"):
            break
        time.sleep(0.5)
    assert record["registered"], record
    answer = srv.openai().chat.completions.create(
        model="trained", messages=[{"role": "user", "content": QA[0][0]}], max_tokens=4
    )
    assert answer.usage.completion_tokens >= 1


# --- what real clients ask for: logprobs, echo, structured outputs, tool calls --------------
# Both engines serve these the same way (vLLM through its SamplingParams and its llguidance
# backend, the grammar library of the hf engine); log probabilities are checked against a
# log-softmax of the same model's logits computed here, outside the server.

# cross-implementation tolerance: vLLM's CPU kernels against a plain transformers forward
LOGPROB_TOL = 2e-3


@pytest.fixture(scope="module")
def reference(model):
    """token ids -> log-softmax of the model's logits at every position, (seq, vocab)."""
    import torch

    from tests.support import load_causal_lm

    lm = load_causal_lm(model)

    def logprobs(ids: list[int]):
        with torch.inference_mode():
            return torch.log_softmax(lm(torch.tensor([ids])).logits[0].float(), dim=-1)

    return logprobs


@pytest.fixture(scope="module")
def tokenizer(model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def test_logprobs_of_greedy_tokens_are_the_models_top(server, reference):
    import torch

    _, srv = server
    prompt = [2, 40, 41, 42, 43]  # token ids: what is scored is exactly what is sent
    r = srv.openai().completions.create(
        model="base", prompt=prompt, max_tokens=4, temperature=0, logprobs=3
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    ids = list(prompt)
    for i in range(4):
        ref = reference(ids)[-1]
        # greedy: the chosen token's logprob is the largest of its alternatives
        assert lp.token_logprobs[i] == max(lp.top_logprobs[i].values())
        assert lp.token_logprobs[i] == pytest.approx(float(ref.max()), abs=LOGPROB_TOL)
        top = sorted(lp.top_logprobs[i].values(), reverse=True)
        assert top == pytest.approx(torch.topk(ref, 3).values.tolist(), abs=LOGPROB_TOL)
        ids.append(int(torch.argmax(ref)))
    # chat: logprobs + top_logprobs, one entry per completion token, streamed alike
    client = srv.openai()
    kwargs = dict(
        model="base",
        messages=[{"role": "user", "content": PROMPTS[0]}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
    )
    whole = client.chat.completions.create(**kwargs)
    content = whole.choices[0].logprobs.content
    assert content and len(content) == whole.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 5 and entry.bytes
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-6)
    streamed = [
        e
        for chunk in client.chat.completions.create(**kwargs, stream=True)
        if chunk.choices and chunk.choices[0].logprobs
        for e in chunk.choices[0].logprobs.content
    ]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [
        (e.token, round(e.logprob, 4)) for e in content
    ]


def test_echo_returns_the_prompt_token_logprobs(server, reference):
    """What lm-evaluation-harness sends for loglikelihood: echo, max_tokens 0 or 1."""
    _, srv = server
    prompt = [2, 50, 60, 70, 80, 90]
    ref = reference(prompt)
    for max_tokens in (0, 1):
        r = srv.openai().completions.create(
            model="base", prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=1, echo=True
        )
        lp = r.choices[0].logprobs
        assert len(lp.token_logprobs) == len(prompt) + max_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for i in range(1, len(prompt)):
            want = float(ref[i - 1, prompt[i]])
            assert lp.token_logprobs[i] == pytest.approx(want, abs=LOGPROB_TOL)
            best = max(lp.top_logprobs[i].values())
            assert best == pytest.approx(float(ref[i - 1].max()), abs=LOGPROB_TOL)
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == max_tokens
    # a text prompt is echoed before the answer
    r = srv.openai().completions.create(
        model="base", prompt=PROMPTS[0], max_tokens=2, temperature=0, echo=True, logprobs=0
    )
    assert r.choices[0].text.startswith(PROMPTS[0])


# every field bounded: the longest answer fits in max_tokens, so each one must close
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 4},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "role": {"enum": ["admin", "user"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
        "home": {
            "type": "object",
            "properties": {"zip": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "tags", "home"],
    "additionalProperties": False,
}


def test_json_schema_output_parses_and_validates(server):
    import jsonschema

    _, srv = server
    client = srv.openai()
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }
    for seed in range(2):
        kwargs = dict(
            model="base",
            messages=[{"role": "user", "content": "A person as JSON."}],
            max_tokens=96,
            temperature=1.0,
            seed=seed,
            response_format=response_format,
        )
        r = client.chat.completions.create(**kwargs)
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
        chunks = client.chat.completions.create(**kwargs, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == r.choices[0].message.content  # same seed, same answer
    # JSON mode on completions: an object, or cut by max_tokens
    c = client.completions.create(
        model="base",
        prompt="A person:",
        max_tokens=32,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )
    if c.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(c.choices[0].text), dict)
    else:
        assert c.choices[0].text.startswith("{")


def test_logprobs_under_a_grammar_list_only_allowed_tokens(server):
    _, srv = server
    r = srv.openai().chat.completions.create(
        model="base",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=2,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
        response_format={"type": "json_object"},
    )
    first = r.choices[0].logprobs.content[0]  # after the grammar mask: "{" is all there is
    assert first.token == "{" and first.logprob == pytest.approx(0.0, abs=1e-5)
    assert [t.token for t in first.top_logprobs] == ["{"]


def test_constrained_and_free_rows_on_different_adapters_match_their_solo_runs(
    server, adapter_dirs
):
    """A row under a JSON schema on one adapter, a free row with logprobs on the base and
    one more adapter row, in one batch: each equals its run alone."""
    _, srv = server
    for name in ("a0", "a2"):
        r = register(srv, name, adapter_dirs[name])
        assert r.status_code in (201, 409), r.text  # 409: registered by an earlier test
    client = srv.openai()
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }

    def constrained() -> str:
        r = client.chat.completions.create(
            model="a0",
            messages=[{"role": "user", "content": "A person as JSON."}],
            max_tokens=96,
            temperature=0,
            response_format=response_format,
        )
        return r.choices[0].message.content

    def free() -> tuple[str, list[float]]:
        r = client.completions.create(
            model="base", prompt=PROMPTS[1], max_tokens=8, temperature=0, logprobs=2
        )
        return r.choices[0].text, [round(x, 4) for x in r.choices[0].logprobs.token_logprobs]

    calls = [constrained, free, lambda: greedy(srv, "a2", PROMPTS[2])]
    solo = [call() for call in calls]
    with ThreadPoolExecutor(len(calls)) as pool:
        together = list(pool.map(lambda call: call(), calls))
    assert together == solo
    assert json.loads(solo[0]).keys() == PERSON["properties"].keys()


COUNT = {
    "type": "function",
    "function": {
        "name": "count",
        "parameters": {
            "type": "object",
            "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["n"],
            "additionalProperties": False,
        },
    },
}


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "count"}}]
)
def test_a_forced_tool_call_returns_valid_arguments(server, tool_choice):
    import jsonschema

    _, srv = server
    r = srv.openai().chat.completions.create(
        model="base",
        messages=[{"role": "user", "content": "Count."}],
        tools=[COUNT],
        tool_choice=tool_choice,
        parallel_tool_calls=False,
        max_tokens=64,
        temperature=0,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "count"
    jsonschema.validate(json.loads(call.function.arguments), COUNT["function"]["parameters"])


def test_logit_bias_forces_a_token(server, tokenizer, reference):
    engine, srv = server
    token = tokenizer.convert_tokens_to_ids("!")
    prompt = [2, 40, 41, 42]
    r = srv.openai().completions.create(
        model="base",
        prompt=prompt,
        max_tokens=3,
        temperature=0,
        logit_bias={str(token): 100},
        logprobs=1,
    )
    assert r.choices[0].text == "!!!"
    first = r.choices[0].logprobs.token_logprobs[0]
    if engine == "hf":  # logprobs after logit_bias: the forced token is all there is
        assert first == pytest.approx(0.0, abs=1e-3)
    else:  # vLLM's raw logprobs (README): the model's own, before logit_bias
        want = float(reference(prompt)[-1, token])
        assert want < -1 and first == pytest.approx(want, abs=LOGPROB_TOL)


def test_disconnect_frees_the_slot(server):
    _, srv = server
    payload = {
        "model": "base",
        "prompt": PROMPTS[1],
        "max_tokens": 400,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{srv.url}/v1/completions", json=payload, timeout=60) as r:
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: {")
            if got >= 3:
                break
    cancelled = gauge(srv, "cancelled")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (gauge(srv, "running") or cancelled < 1):
        time.sleep(0.2)
        cancelled = gauge(srv, "cancelled")
    assert cancelled >= 1 and gauge(srv, "running") == 0


def test_tensor_parallel_2_matches_1(server, model, tmp_path):
    """TP=2 (one CPU core per rank) gives the same greedy tokens as this TP=1 server."""
    engine, srv = server
    if engine != "vllm":
        pytest.skip("tensor parallelism is the vllm engine's")
    one = [greedy(srv, "base", p, max_tokens=10) for p in PROMPTS]
    tp2 = start_server(engine, model, tmp_path / "tp2", SWAPSERVE_TENSOR_PARALLEL_SIZE="2")
    try:
        assert httpx.get(f"{tp2.url}/ready", timeout=10).status_code == 200
        two = [greedy(tp2, "base", p, max_tokens=10) for p in PROMPTS]
    finally:
        tp2.stop()
    assert two == one


def test_shutdown_drains_running_requests(server):
    """SIGTERM: a running stream finishes (within the grace), new requests get 503, the
    process exits on its own."""
    _, srv = server
    lines: list[str] = []
    started = threading.Event()

    def stream() -> None:
        # long enough to outlast the probes below on a quiet machine (the tiny model streams
        # 48 tokens in well under a second: the process had exited before the probe)
        body = {"model": "base", "prompt": PROMPTS[0], "max_tokens": 400, "stream": True}
        body["ignore_eos"] = True
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(60)
    srv.signal(signal.SIGTERM)
    deadline = time.monotonic() + 10  # the drain begins when the signal is handled
    while httpx.get(f"{srv.url}/ready", timeout=10).status_code != 503:
        assert time.monotonic() < deadline, "/ready never said draining"
        time.sleep(0.01)
    r = httpx.post(
        f"{srv.url}/v1/completions",
        json={"model": "base", "prompt": "hi", "max_tokens": 2},
        timeout=10,
    )
    assert r.status_code == 503
    reader.join(120)
    assert srv.wait(120) == 0
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert lines[-1] == "data: [DONE]"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
