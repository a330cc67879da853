"""lm-evaluation-harness against the real server on the tiny model, run with the very
command the README gives (`lm_eval --model local-completions ...`) on the repo's own tasks
(clients/lm_eval_tasks: local JSONL, no dataset hub). Each of lm_eval's per-sample results
is checked against what the server itself says through the `openai` client: a choice's
loglikelihood is the sum of the prompt logprobs (echo) of its tokens, and a generation is
the greedy completion of the same token ids. Skipped when lm_eval is not installed (it is in
the `test` extra)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import start_live_server
from tests.tiny_model import build_tiny_model

pytest.importorskip(
    "lm_eval", reason="lm_eval is not installed: pip install -e '.[test]' (or lm_eval)"
)

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "clients" / "lm_eval_tasks"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("tiny-lmeval"), arch="llama")
    live = start_live_server(
        base_model=str(path),
        quantization="none",
        max_model_len=512,
        default_max_tokens=16,
        data_dir=tmp_path_factory.mktemp("lmeval-data"),
    )
    live.model_path = path
    yield live
    live.stop()


@pytest.fixture(scope="module")
def lm_eval_run(server, tmp_path_factory):
    """lm_eval's CLI as a user runs it; returns (results, samples by task)."""
    out = tmp_path_factory.mktemp("lmeval-out")
    model_args = (
        f"model=base,base_url={server.url}/v1/completions,"
        f"tokenizer_backend=huggingface,tokenizer={server.model_path}"
    )
    cmd = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "local-completions",
        "--model_args",
        model_args,
        "--include_path",
        str(TASKS),
        "--tasks",
        "swapserve_capitals,swapserve_capitals_gen",
        "--output_path",
        str(out),
        "--log_samples",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    # lm_eval prints its table of scores
    assert "swapserve_capitals" in done.stdout and "acc" in done.stdout, done.stdout
    (results_path,) = out.rglob("results_*.json")
    samples = {}
    for task in ("swapserve_capitals", "swapserve_capitals_gen"):
        (path,) = out.rglob(f"samples_{task}_2*.jsonl")
        samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
    return json.loads(results_path.read_text()), samples


def _tokenizer(server):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(server.model_path)


def _encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """As lm_eval splits a request: trailing spaces of the context go to the continuation,
    the whole is encoded once and cut at the context's length."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx) :]


def test_loglikelihoods_are_the_servers_prompt_logprobs(server, lm_eval_run):
    results, samples = lm_eval_run
    tok = _tokenizer(server)
    client = server.openai()
    rows = samples["swapserve_capitals"]
    assert len(rows) == 12
    correct = 0
    for row in rows:
        got, expected = [], []
        for i, arg in enumerate(row["arguments"].values()):
            ctx, cont = _encode_pair(tok, arg["arg_0"], arg["arg_1"])
            # the prompt's own logprobs, no generated token: entry i is log p(token i | before)
            r = client.completions.create(
                model="base", prompt=ctx + cont, max_tokens=0, echo=True, logprobs=1
            )
            lp = r.choices[0].logprobs
            assert len(lp.token_logprobs) == len(ctx) + len(cont)
            assert lp.token_logprobs[0] is None
            cont_lps = lp.token_logprobs[len(ctx) :]
            greedy = all(
                v == max(top.values())
                for v, top in zip(cont_lps, lp.top_logprobs[len(ctx) :], strict=True)
            )
            expected.append((sum(cont_lps), greedy))
            loglik, is_greedy = row["resps"][i][0]
            got.append((float(loglik), is_greedy == "True"))
        assert [g[1] for g in got] == [e[1] for e in expected]
        assert [g[0] for g in got] == pytest.approx([e[0] for e in expected], rel=1e-5, abs=1e-4)
        # acc is the argmax of those loglikelihoods
        pick = max(range(len(expected)), key=lambda k: expected[k][0])
        assert row["acc"] == float(pick == row["doc"]["label"])
        correct += pick == row["doc"]["label"]
    score = results["results"]["swapserve_capitals"]["acc,none"]
    assert score == pytest.approx(correct / len(rows))


def test_generations_are_the_servers_greedy_completions(server, lm_eval_run):
    results, samples = lm_eval_run
    tok = _tokenizer(server)
    client = server.openai()
    rows = samples["swapserve_capitals_gen"]
    assert len(rows) == 12
    for row in rows:
        arg = row["arguments"]["gen_args_0"]
        ctx = tok(arg["arg_0"], add_special_tokens=False)["input_ids"]
        until = arg["arg_1"]["until"]
        r = client.completions.create(
            model="base",
            prompt=ctx,
            max_tokens=arg["arg_1"]["max_gen_toks"],
            temperature=0,
            stop=[*until, tok.eos_token],  # lm_eval adds the tokenizer's eos to `until`
        )
        assert row["resps"][0][0] == r.choices[0].text
    assert "exact_match,none" in results["results"]["swapserve_capitals_gen"]
