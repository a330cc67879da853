"""Decode tokens/s: the server path (HTTP + SSE, one request at a time) vs plain
`model.generate` on the same 4-bit model, measured in one run on this machine.

    python loadtests/bench_generate.py [--tokens 64] [--runs 3]

Prints both figures and their ratio (server / generate). The two are measured one after
the other, never at once, so they do not compete for cores.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests._server import running_server  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def server_decode_rate(url: str, tokens: int, runs: int) -> float:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    rates = []
    for i in range(runs + 1):  # the first run warms up
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
        if i and first and last and last > first:
            rates.append((completion - 1) / (last - first))
    return statistics.median(rates)


def generate_decode_rate(tokens: int, runs: int) -> float:
    import torch

    from trainer.base_model import load_base_model

    loaded = load_base_model(None, quantization="nf4")
    ids = loaded.tokenizer(PROMPT, return_tensors="pt")

    def timed(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            loaded.model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - start

    timed(2)  # warm-up
    rates = []
    for _ in range(runs):
        one = timed(1)  # prefill + first token
        full = timed(tokens)
        rates.append((tokens - 1) / (full - one))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with running_server() as url:
        server = server_decode_rate(url, args.tokens, args.runs)
    plain = generate_decode_rate(args.tokens, args.runs)
    print(f"decode tokens/s, one request at a time, bundled model in NF4, {args.tokens} tokens")
    print(f"  server (HTTP, SSE):   {server:8.2f} tok/s")
    print(f"  plain model.generate: {plain:8.2f} tok/s")
    print(f"  ratio server/generate: {server / plain:.2f}")


if __name__ == "__main__":
    main()
