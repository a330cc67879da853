"""Decode tokens/s: the server path (HTTP + SSE, one request at a time) vs plain
`model.generate` on the same 4-bit model, measured in one run on this machine.

    python loadtests/bench_generate.py [--tokens 64] [--runs 3]

Prints both figures and their ratio (server / generate). The two are measured in turns
(server, generate, server, generate, ...), never at once: the idle server uses no CPU
while `generate` runs, and a machine whose load changes over time affects both alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests._server import BENCH_BASE, running_server  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def server_decode_rate(client, tokens: int) -> float:
    """One streamed request; decode rate from the first to the last token."""
    stream = client.completions.create(
        model="base",
        prompt=PROMPT,
        max_tokens=tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    first = last = None
    completion = 0
    for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].text:
            first = first or now
            last = now
        if chunk.usage:
            completion = chunk.usage.completion_tokens
    assert first is not None and last is not None and last > first
    return (completion - 1) / (last - first)


def generate_decoder(tokens: int):
    """A function timing plain `model.generate` on the same NF4 model, in this process."""
    import torch

    from trainer.base_model import load_base_model

    loaded = load_base_model(BENCH_BASE, quantization="nf4")
    ids = loaded.tokenizer(PROMPT, return_tensors="pt")

    def timed(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            loaded.model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - start

    def rate() -> float:
        one = timed(1)  # prefill + first token
        full = timed(tokens)
        return (tokens - 1) / (full - one)

    timed(2)  # warm-up
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    import openai

    with running_server() as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        server_decode_rate(client, 4)  # warm-up
        plain_rate = generate_decoder(args.tokens)
        served, plain = [], []
        for _ in range(args.runs):
            served.append(server_decode_rate(client, args.tokens))
            plain.append(plain_rate())
    server, plain_median = statistics.median(served), statistics.median(plain)
    ratios = [a / b for a, b in zip(served, plain, strict=True)]
    print(f"decode tokens/s, one request at a time, {BENCH_BASE} in NF4, {args.tokens} tokens")
    print(f"  server (HTTP, SSE):   {server:8.2f} tok/s (median of {args.runs})")
    print(f"  plain model.generate: {plain_median:8.2f} tok/s (median of {args.runs})")
    print(
        f"  ratio server/generate: {server / plain_median:.2f} "
        f"(per pair: {', '.join(f'{r:.2f}' for r in ratios)})"
    )


if __name__ == "__main__":
    main()
