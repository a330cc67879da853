"""One mixed batch of every adapter kind, through the official `openai` client.

    python loadtests/mixed_kinds.py --server http://127.0.0.1:8000 [--models a,b,c] [--tokens 24]

For a running server: every adapter it serves (or those named) and the base. Each model's
greedy answer to one question alone, then all of them at once as streams: once every
stream has its first token, the server's decode batch (the `swapserve_engine_batch_size`
gauge on /metrics) is read until it holds them all (5 s at most); then each stream's
answer is compared with its answer alone. Prints a line per model (its kind, equal or
not; where they part, how far apart the two leading candidates were alone) and exits 1 if
an answer parts from its answer alone other than at a near tie (the leading two within
0.05 of log probability, where batched arithmetic may round the other way), or the batch
never held them all.

After `swapserve train compare --server URL`, this shows one adapter of each kind served by
`model` in one batch.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import httpx
from openai import OpenAI

# answers that part where the two leading candidates were closer than this (log
# probability) part at a rounding tie, not at a different model: reported, not failed
NEAR_TIE = 0.05
QUESTION = "In one sentence: why do ships have lighthouses to guide them?"


def _batch_size(server: str, headers: dict) -> int:
    text = httpx.get(f"{server}/metrics", headers=headers, timeout=10).text
    for line in text.splitlines():
        if line.startswith("swapserve_engine_batch_size "):
            return int(float(line.split()[1]))
    return -1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--models", default=None, help="comma-separated; default: all adapters")
    parser.add_argument("--tokens", type=int, default=24)
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"}
    client = OpenAI(base_url=f"{args.server}/v1", api_key=args.api_key)
    adapters = httpx.get(f"{args.server}/adapters", headers=headers, timeout=10).json()["data"]
    kinds = {a["name"]: a.get("kind", "lora") for a in adapters}
    models = args.models.split(",") if args.models else sorted(kinds)
    models = ["base"] + [m for m in models if m != "base"]
    kinds["base"] = "base"

    def ask(model: str, out: dict, first: threading.Barrier | None = None) -> None:
        # together: ten times longer, so that every stream is still running when the
        # batch is read; its first ``tokens`` tokens are compared with the answer alone
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=args.tokens if first is None else 10 * args.tokens,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        text, waited = [], first is None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
                if not waited:
                    first.wait()  # every stream has its first token: all are running
                    waited = True
        out[model] = "".join(text)

    alone: dict[str, str] = {}
    margins: dict[str, list[tuple[str, float]]] = {}  # per token of the answer alone
    for model in models:
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=args.tokens,
            temperature=0,
            logprobs=True,
            top_logprobs=2,
            extra_body={"ignore_eos": True},
        )
        alone[model] = r.choices[0].message.content or ""
        margins[model] = [
            (t.token, t.top_logprobs[0].logprob - t.top_logprobs[1].logprob)
            for t in r.choices[0].logprobs.content
            if len(t.top_logprobs) >= 2
        ]
    together: dict[str, str] = {}
    first = threading.Barrier(len(models) + 1)
    threads = [threading.Thread(target=ask, args=(m, together, first)) for m in models]
    for thread in threads:
        thread.start()
    first.wait(timeout=300)
    # the rows that prefilled last join the running batch at the next decode step
    seen = 0
    for _ in range(50):
        seen = max(seen, _batch_size(args.server, headers))
        if seen >= len(models):
            break
        time.sleep(0.1)
    for thread in threads:
        thread.join()
    failed = False
    for model in models:
        same = together.get(model, "").startswith(alone[model])
        print(
            f"{model:<24} {kinds.get(model, '?'):<14} {'same as alone' if same else 'DIFFERS'}"
            f"   {alone[model][:60] if same else alone[model]!r}"
        )
        if not same:
            print(f"{'':<24} {'together:':<14} {together.get(model, '')[: len(alone[model])]!r}")
            # where the two part: how far apart the leading two candidates were alone
            text, got = "", together.get(model, "")
            for token, margin in margins[model]:
                if not got.startswith(text + token):
                    tie = margin < NEAR_TIE
                    failed |= not tie
                    print(
                        f"{'':<24} {'parts at':<14} {token!r}: the top two log probabilities "
                        f"{margin:.3f} apart alone"
                        + (" (a near tie: batched arithmetic rounds differently)" if tie else "")
                    )
                    break
                text += token
            else:
                failed = True
    print(
        f"largest decode batch once every stream had its first token: {seen} rows "
        f"({len(models)} models)"
    )
    if seen < len(models):
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
