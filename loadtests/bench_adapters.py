"""Multi-adapter serving on the bundled model (NF4), every figure a ratio measured in one run.

    python loadtests/bench_adapters.py [--tokens 32] [--streams 8] [--max-registered 64]
                                       [--rounds 7]

a) throughput, 8 streams over 8 adapters / 8 streams on one adapter        (goal >= 0.9)
b) our server, 8 streams over 8 adapters / naive one-at-a-time set_adapter (goal >= 3x)
c) TTFT of a short request while a long generation runs / TTFT when idle   (goal <= 1.5)
d) ms from POST /adapters (rank 16, all linear layers) to the first token
e) aggregate tok/s, 8 streams over 8 adapters, as registered adapters grow to 64
   (max(8, streams) resident on the device): what eviction costs
f) 8 streams over 8 adapters / llama.cpp's single stream on the same GGUF  (goal >= 3x):
   decode rates both (first token to last), and ours with each stream's prefill and HTTP
   (llama.cpp cannot mix adapters in a batch; skipped, saying how to install it, when
   llama-cpp-python is absent), and the vLLM engine's 8 streams over the same 8 adapters
   when .venv-vllm exists

The server runs as a child process; the naive baseline and llama.cpp run in this process
after the server has stopped, so they never compete for cores.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import openai  # noqa: E402

from loadtests._adapters import linear_shapes_from_config, random_lora_adapter  # noqa: E402
from loadtests._peers import hardware, llama_cpp, vllm_python  # noqa: E402
from loadtests._requests import TokenTimes  # noqa: E402
from loadtests._server import BENCH_BASE, running_server  # noqa: E402
from trainer.base_model import resolve_base_model  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def async_client(url: str) -> openai.AsyncOpenAI:
    """Use as `async with`: closed inside the event loop that opened it."""
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=600)


@dataclass
class Run:
    """One round of concurrent streams."""

    tokens: int  # completion tokens of every stream
    wall: float  # seconds from the requests to the last token (prefill and HTTP included)
    decoding: float  # seconds from the first stream's first token to the last stream's last
    streams: int

    @property
    def tok_s(self) -> float:
        """Aggregate tokens/s, prefills included."""
        return self.tokens / self.wall

    @property
    def decode_tok_s(self) -> float:
        """Aggregate decode tokens/s, as llama.cpp's single stream is measured: the tokens
        after each stream's first, over the time from the first first token to the last
        token (a stream prefilled later counts against it)."""
        return (self.tokens - self.streams) / self.decoding


async def run_streams(url: str, models: list[str], tokens: int) -> Run:
    """Concurrent streamed completions, one per entry of `models`."""
    async with async_client(url) as client:

        async def one(model: str) -> TokenTimes:
            stream = await client.completions.create(
                model=model,
                prompt=PROMPT,
                max_tokens=tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            times = TokenTimes()
            async for chunk in stream:
                times.see(chunk)
            assert times.first is not None and times.last is not None
            return times

        start = time.perf_counter()
        done = await asyncio.gather(*(one(m) for m in models))
        firsts = [t.first for t in done if t.first is not None]
        lasts = [t.last for t in done if t.last is not None]
        return Run(
            tokens=sum(t.tokens for t in done),
            wall=max(lasts) - start,
            decoding=max(lasts) - min(firsts),
            streams=len(models),
        )


async def throughput(url: str, models: list[str], tokens: int) -> float:
    """Aggregate completion tokens/s of concurrent streams, prefills included."""
    return (await run_streams(url, models, tokens)).tok_s


async def ttft(url: str, model: str, prompt: str) -> float:
    async with async_client(url) as client:
        start = time.perf_counter()
        stream = await client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=4,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        first = None
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter()
        return (first or time.perf_counter()) - start


async def ttft_under_load(url: str, tokens: int) -> tuple[float, float]:
    idle = min([await ttft(url, "base", "Hello, my name is") for _ in range(3)])
    async with async_client(url) as client:
        long = await client.completions.create(
            model="base",
            prompt=PROMPT * 4,
            max_tokens=tokens * 4,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        seen = 0
        loaded = []
        async for chunk in long:
            if chunk.choices and chunk.choices[0].text:
                seen += 1
            if seen == 3 and len(loaded) < 3:  # the long stream is decoding now
                loaded.append(await ttft(url, "base", "Hello, my name is"))
                seen = 0
            if len(loaded) == 3:
                break
        await long.close()
    return idle, min(loaded)


def register(url: str, name: str, path: Path) -> None:
    r = httpx.post(f"{url}/adapters", json={"name": name, "path": str(path)}, timeout=600)
    r.raise_for_status()


async def register_to_first_token(url: str, path: Path) -> float:
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as client:
        r = await client.post(f"{url}/adapters", json={"name": "fresh", "path": str(path)})
        r.raise_for_status()
    async with async_client(url) as oa:
        stream = await oa.completions.create(
            model="fresh", prompt="Hi", max_tokens=2, stream=True, extra_body={"ignore_eos": True}
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                break
        await stream.close()
    return (time.perf_counter() - start) * 1000


def naive_baseline(paths: list[Path], tokens: int) -> float:
    """One request at a time; switch adapters with set_adapter, as a plain PEFT server does."""
    import torch
    from peft import PeftModel

    from trainer.base_model import load_base_model

    loaded = load_base_model(BENCH_BASE, quantization="nf4")
    model = PeftModel.from_pretrained(loaded.model, str(paths[0]), adapter_name="n0")
    for i, p in enumerate(paths[1:], start=1):
        model.load_adapter(str(p), adapter_name=f"n{i}")
    model.eval()
    ids = loaded.tokenizer(PROMPT, return_tensors="pt").to(loaded.model.device)
    with torch.inference_mode():
        model.set_adapter("n0")
        model.generate(**ids, max_new_tokens=2, do_sample=False)  # warm-up
        start = time.perf_counter()
        for i in range(len(paths)):
            model.set_adapter(f"n{i}")
            model.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return len(paths) * tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-registered", type=int, default=64)
    # a round of a) moves by +-15 % with the machine (one busy second in a 1.5 s round):
    # seven rounds' medians hold the ratio to a few percent
    parser.add_argument("--rounds", type=int, default=7, help="rounds of a) and c), in turns")
    args = parser.parse_args()
    n, tokens = args.streams, args.tokens

    base_path = resolve_base_model(BENCH_BASE)
    shapes = linear_shapes_from_config(json.loads((base_path / "config.json").read_text()))
    work = Path(tempfile.mkdtemp(prefix="swapserve-bench-"))
    atexit.register(shutil.rmtree, work, True)  # its adapters: ~2 GB on Gemma
    paths = [
        random_lora_adapter(work / f"ad{i}", shapes, r=16, seed=i, base_name=base_path.name)
        for i in range(args.max_registered + 1)
    ]
    env = {
        "SWAPSERVE_DATA_DIR": str(work / "data"),
        "SWAPSERVE_MAX_LORAS": str(max(8, n)),
        "SWAPSERVE_MAX_CPU_LORAS": "64",
        "SWAPSERVE_MAX_NUM_SEQS": str(max(16, n)),
    }
    results: dict[str, float] = {}
    growth: list[tuple[int, float]] = []
    with running_server(env) as url:
        ready = httpx.get(f"{url}/ready", timeout=30).json()
        for i in range(n):
            register(url, f"ad{i}", paths[i])
        # warm-up at the measured batch size, mixed and not (on a GPU the first batch of a
        # new size pays for kernel selection: measured first, it looked half as fast)
        asyncio.run(throughput(url, ["ad0"] * n, 8))
        asyncio.run(throughput(url, [f"ad{i}" for i in range(n)], 8))
        # in turns, round after round, so that the machine's drift moves both alike; the
        # medians and each round's ratio are printed
        one, mixed, idles, loadeds = [], [], [], []
        mixed_decode: list[float] = []
        for _ in range(args.rounds):
            one.append(asyncio.run(throughput(url, ["ad0"] * n, tokens)))
            run = asyncio.run(run_streams(url, [f"ad{i}" for i in range(n)], tokens))
            mixed.append(run.tok_s)
            mixed_decode.append(run.decode_tok_s)
            idle, loaded = asyncio.run(ttft_under_load(url, tokens))
            idles.append(idle)
            loadeds.append(loaded)
        results["one_adapter"] = statistics.median(one)
        results["n_adapters"] = statistics.median(mixed)
        results["n_adapters_decode"] = statistics.median(mixed_decode)
        results["ttft_idle"] = statistics.median(idles)
        results["ttft_loaded"] = statistics.median(loadeds)
        per_round = [m / o for m, o in zip(mixed, one, strict=True)]
        ttft_rounds = [b / a for a, b in zip(idles, loadeds, strict=True)]
        results["register_to_token_ms"] = asyncio.run(
            register_to_first_token(url, paths[args.max_registered])
        )
        registered = n
        growth.append((registered, results["n_adapters"]))
        while registered < args.max_registered:
            target = min(args.max_registered, registered * 2)
            for i in range(registered, target):
                register(url, f"ad{i}", paths[i])
            registered = target
            # spread over everything registered: most picks are not resident, so each run
            # pays for loads and evictions
            step = max(1, registered // n)
            pick = [f"ad{i}" for i in range(0, registered, step)][:n]
            growth.append((registered, asyncio.run(throughput(url, pick, tokens))))
    python = vllm_python()
    if python is not None:
        # a data directory of its own: the hf server's registry already names these adapters
        vllm_env = {**env, "SWAPSERVE_ENGINE": "vllm", "SWAPSERVE_DATA_DIR": str(work / "vllm")}
        with running_server(vllm_env, python=str(python)) as url:
            for i in range(n):
                register(url, f"ad{i}", paths[i])
            asyncio.run(throughput(url, ["ad0"] * 2, 4))  # warm-up
            run = asyncio.run(run_streams(url, [f"ad{i}" for i in range(n)], tokens))
            results["vllm_n_adapters"] = run.tok_s
            results["vllm_n_adapters_decode"] = run.decode_tok_s
    # one request at a time: the rate does not grow with the number of adapters cycled
    naive = naive_baseline(paths[: min(n, 8)], tokens)
    llama = llama_cpp(BENCH_BASE)
    if llama is not None:
        llama.decode_rate(PROMPT, 4)  # warm-up
        results["llama_cpp"] = statistics.median(
            llama.decode_rate(PROMPT, tokens) for _ in range(max(3, args.rounds))
        )

    print(
        f"\n{BENCH_BASE}, {ready['quantization']} ({ready['weights_format']}), {hardware()}; "
        f"{n} streams x {tokens} tokens, rank-16 adapters"
    )
    print(
        f"  {n} streams on one adapter:        {results['one_adapter']:7.2f} tok/s"
        f"  (median of {args.rounds}: {', '.join(f'{x:.1f}' for x in one)})"
    )
    print(
        f"  {n} streams over {n} adapters:       {results['n_adapters']:7.2f} tok/s"
        f"  (median of {args.rounds}: {', '.join(f'{x:.1f}' for x in mixed)})"
    )
    print(f"  naive set_adapter, one at a time: {naive:7.2f} tok/s")
    print(
        f"a) {n} adapters / one adapter:        {results['n_adapters'] / results['one_adapter']:.2f}"
        f"  (goal >= 0.9; per round: {', '.join(f'{r:.2f}' for r in per_round)})"
    )
    print(f"b) ours / naive set_adapter:         {results['n_adapters'] / naive:.2f}x  (goal >= 3)")
    print(
        f"c) TTFT under load / idle:           {results['ttft_loaded'] / results['ttft_idle']:.2f}"
        f"  ({results['ttft_loaded'] * 1000:.0f} ms vs {results['ttft_idle'] * 1000:.0f} ms;"
        f" goal <= 1.5; per round: {', '.join(f'{r:.2f}' for r in ttft_rounds)})"
    )
    print(f"d) POST /adapters -> first token:    {results['register_to_token_ms']:.0f} ms")
    print(
        f"e) registered adapters -> tok/s ({max(8, n)} resident; each run touches adapters "
        "not resident)"
    )
    for count, tps in growth:
        print(f"     {count:3d} registered: {tps:7.2f} tok/s  ({tps / growth[0][1]:.2f} of {n})")
    if "llama_cpp" in results:
        single = results["llama_cpp"]
        decode = results["n_adapters_decode"]
        print(
            f"f) {n} streams over {n} adapters / llama.cpp single stream (decode, first token "
            f"to last, as llama.cpp's is measured): {decode:.2f} / {single:.2f} tok/s = "
            f"{decode / single:.2f}x  (goal >= 3; rounds: "
            f"{', '.join(f'{x / single:.2f}' for x in mixed_decode)})"
        )
        print(
            f"   with each stream's prefill and HTTP: {results['n_adapters']:.2f} tok/s = "
            f"{results['n_adapters'] / single:.2f}x"
        )
        if "vllm_n_adapters" in results:
            v, vd = results["vllm_n_adapters"], results["vllm_n_adapters_decode"]
            print(
                f"   vLLM engine, {n} streams over {n} adapters: decode {vd:.2f} tok/s = "
                f"{vd / single:.2f}x; with prefill {v:.2f} tok/s = {v / single:.2f}x"
            )


if __name__ == "__main__":
    main()
