"""Single-stream decode tokens/s: swapserve against its peers, measured in turns in one run.

    python loadtests/bench_generate.py [--tokens 64] [--runs 3] [--no-generate]

Peers, each decoding the same prompt greedily for exactly --tokens tokens, one request at
a time, timed from the first token to the last:
- server:     swapserve as a user starts it (`swapserve serve`, a child process; HTTP + SSE);
- in-process: the same engine and settings driven through the Engine API in this
              process, no HTTP (server / in-process = what the HTTP layer costs);
- generate:   plain transformers `model.generate` on the bitsandbytes NF4 model (what a
              user of transformers + bitsandbytes gets; --no-generate skips it);
- llama.cpp:  llama-cpp-python on the bundled base's own GGUF file (Gemma 3 270M's Q4_K_M,
              SmolLM2's Q4_1; skipped for a model folder), with as many
              threads as this process may use (skipped, saying how to install it, when
              absent);
- vLLM:       swapserve's vLLM engine from .venv-vllm, when that exists (skipped otherwise).
Every figure is printed with its ratio to llama.cpp. The peers are measured in turns
(round after round), never at once: each round waits for the machine to be quiet first
(the vLLM engine's server keeps about a core busy for a second after a request), an idle
swapserve server uses no CPU, and a machine whose load changes over time affects every
peer alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests._peers import hardware, llama_cpp, vllm_python, wait_for_quiet  # noqa: E402
from loadtests._requests import TokenTimes  # noqa: E402
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
    times = TokenTimes()
    for chunk in stream:
        times.see(chunk)
    return times.decode_rate()


def in_process_decoder(tokens: int) -> tuple[Callable[[], float], Callable[[], None]]:
    """The server's engine, built from the same settings, driven without HTTP."""
    from server.config import Settings
    from server.engine.base import GenerationRequest, SamplingParams
    from server.engine.factory import build_engine

    engine = build_engine(Settings(base_model=BENCH_BASE))
    loop = asyncio.new_event_loop()
    loop.run_until_complete(engine.start())
    ids = engine.tokenize(PROMPT)

    async def one(n: int) -> float:
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        first = last = None
        count = 0
        async for out in engine.generate(GenerationRequest("bench", ids, params)):
            now = time.perf_counter()
            if out.token_ids:
                count += len(out.token_ids)
                first = first or now
                last = now
        assert first is not None and last is not None and last > first
        return (count - 1) / (last - first)

    loop.run_until_complete(one(4))  # warm-up

    def stop() -> None:
        loop.run_until_complete(engine.shutdown())
        loop.close()

    return (lambda: loop.run_until_complete(one(tokens))), stop


def generate_decoder(tokens: int) -> Callable[[], float]:
    """Plain `model.generate` on the bitsandbytes NF4 model, in this process."""
    import torch

    from trainer.base_model import load_base_model

    loaded = load_base_model(BENCH_BASE, quantization="nf4")
    ids = loaded.tokenizer(PROMPT, return_tensors="pt").to(loaded.model.device)

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
    parser.add_argument("--no-generate", action="store_true", help="skip model.generate")
    args = parser.parse_args()
    import openai

    peers: dict[str, Callable[[], float]] = {}
    rates: dict[str, list[float]] = {}
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(running_server())
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=600)
        server_decode_rate(client, 4)  # warm-up
        peers["server (HTTP, SSE)"] = lambda: server_decode_rate(client, args.tokens)
        in_process, stop = in_process_decoder(args.tokens)
        stack.callback(stop)
        peers["in-process engine"] = in_process
        if not args.no_generate:
            peers["model.generate, NF4"] = generate_decoder(args.tokens)
        llama = llama_cpp(BENCH_BASE)
        if llama is not None:
            llama.decode_rate(PROMPT, 4)  # warm-up
            peers["llama.cpp"] = lambda: llama.decode_rate(PROMPT, args.tokens)
        python = vllm_python()
        if python is not None:
            vllm_url = stack.enter_context(
                running_server({"SWAPSERVE_ENGINE": "vllm"}, python=str(python))
            )
            vllm_client = openai.OpenAI(base_url=f"{vllm_url}/v1", api_key="x", timeout=600)
            server_decode_rate(vllm_client, 4)  # warm-up
            peers["vLLM engine (server)"] = lambda: server_decode_rate(vllm_client, args.tokens)
        for _ in range(args.runs):
            for name, rate in peers.items():
                wait_for_quiet()  # the previous peer's background work, if any, has ended
                rates.setdefault(name, []).append(rate())

    median = {name: statistics.median(r) for name, r in rates.items()}
    # every figure as a ratio to llama.cpp where it ran, else to plain model.generate
    anchor_name = next((n for n in ("llama.cpp", "model.generate, NF4") if n in median), None)
    anchor = median.get(anchor_name) if anchor_name else None
    print(
        f"\ndecode tokens/s, one request at a time, {BENCH_BASE}, {args.tokens} tokens, "
        f"median of {args.runs} rounds, {hardware()}"
    )
    for name, value in median.items():
        ratio = f"  {value / anchor:5.2f} of {anchor_name}" if anchor else ""
        runs = ", ".join(f"{v:.1f}" for v in rates[name])
        print(f"  {name:<24} {value:8.2f} tok/s{ratio}   (runs: {runs})")
    pairs = [
        a / b for a, b in zip(rates["server (HTTP, SSE)"], rates["in-process engine"], strict=True)
    ]
    print(
        f"  server / in-process: {median['server (HTTP, SSE)'] / median['in-process engine']:.2f}"
        f" (per round: {', '.join(f'{r:.2f}' for r in pairs)}; goal >= 0.9)"
    )
    if anchor_name == "llama.cpp":
        print(f"  server / llama.cpp:  {median['server (HTTP, SSE)'] / anchor:.2f}  (goal >= 0.7)")


if __name__ == "__main__":
    main()
