"""The hf engine, the vllm engine and vLLM's own OpenAI server, on the same model and the
same adapters, one after the other in one run; every figure also as a ratio.

    python loadtests/bench_engines.py [--tokens 32] [--streams 8] [--targets hf,vllm,vllm-plain]

Each target is started by this script as a child process on a free loopback port and
stopped before the next one starts, so no two compete for the cores:
  hf          `swapserve serve`, the hf engine (NF4 and the int8 output layer: its defaults)
  vllm        `swapserve serve` with SWAPSERVE_ENGINE=vllm, from the vLLM environment
  vllm-plain  `python -m vllm.entrypoints.openai.api_server`, same settings as `vllm`
Figures: single-stream decode tok/s (base model), N streams over N adapters tok/s, TTFT of
a short request while N-1 streams decode, and adapter registration (POST /adapters, or
vLLM's POST /v1/load_lora_adapter) to the first token. The last table is swapserve-on-vLLM
over plain vLLM (goal >= 0.9 on throughput: what swapserve's layer costs).

vLLM runs from .venv-vllm (`make vllm-env`; SWAPSERVE_VLLM_PYTHON names another).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import openai  # noqa: E402

from loadtests._adapters import linear_shapes_from_config, random_lora_adapter  # noqa: E402
from loadtests._server import free_port  # noqa: E402
from trainer.base_model import bundled_model_id, resolve_base_model  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
MAX_MODEL_LEN = 1024


def vllm_python() -> str:
    python = os.environ.get("SWAPSERVE_VLLM_PYTHON") or str(ROOT / ".venv-vllm/bin/python")
    if not Path(python).is_file():
        sys.exit(f"no vLLM environment at {python}: run `make vllm-env` first")
    return python


def command(target: str, model: Path, port: int, streams: int, data_dir: Path) -> list[str]:
    if target == "vllm-plain":
        return [
            vllm_python(),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model),
            "--served-model-name",
            "base",
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--enforce-eager",
            "--max-model-len",
            str(MAX_MODEL_LEN),
            "--max-num-seqs",
            str(streams),
            "--enable-lora",
            "--max-loras",
            str(streams),
            "--max-cpu-loras",
            str(2 * streams),
            "--max-lora-rank",
            "16",
            "--kv-cache-memory-bytes",
            str(2**30),
            "--disable-log-stats",
            "--uvicorn-log-level",
            "warning",
        ]
    python = vllm_python() if target == "vllm" else sys.executable
    return [python, "-m", "server.cli", "serve", "--port", str(port), "--log-level", "WARNING"]


def environment(target: str, model: Path, streams: int, data_dir: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "SWAPSERVE_BASE_MODEL": str(model),
        "SWAPSERVE_DATA_DIR": str(data_dir),
        "SWAPSERVE_MAX_MODEL_LEN": str(MAX_MODEL_LEN),
        "SWAPSERVE_MAX_NUM_SEQS": str(streams),
        "SWAPSERVE_MAX_LORAS": str(streams),
        "SWAPSERVE_MAX_CPU_LORAS": str(2 * streams),
        "SWAPSERVE_MAX_LORA_RANK": "16",
        "SWAPSERVE_ENGINE": "vllm" if target == "vllm" else "hf",
        "SWAPSERVE_KV_CACHE_GIB": "1",
        # vLLM's own server reads this to allow /v1/load_lora_adapter
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
    }
    if target.startswith("vllm"):
        # the same thread binding for both vLLM targets: every core to the one worker
        cores = sorted(os.sched_getaffinity(0))
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))
    if target == "hf":
        env.pop("SWAPSERVE_BASE_MODEL")  # the bundled model by name: the converted folder
    return env


@contextmanager
def started(target: str, model: Path, streams: int, log: Path) -> Iterator[str]:
    port = free_port()
    data_dir = Path(tempfile.mkdtemp(prefix=f"bench-{target}-"))
    with log.open("w") as out:
        proc = subprocess.Popen(
            command(target, model, port, streams, data_dir),
            env=environment(target, model, streams, data_dir),
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    probe = "/health" if target == "vllm-plain" else "/ready"
    started_at = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{target} exited with {proc.returncode}; see {log}")
            try:
                if httpx.get(url + probe, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - started_at > 1800:
                raise TimeoutError(f"{target} did not start; see {log}")
            time.sleep(1)
        print(f"  {target} ready in {time.monotonic() - started_at:.0f} s", flush=True)
        yield url
    finally:
        proc.terminate()  # SIGTERM: both servers shut vLLM's processes down
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()


async def register(client: httpx.AsyncClient, url: str, target: str, name: str, path: Path):
    if target == "vllm-plain":
        r = await client.post(
            f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}
        )
    else:
        r = await client.post(f"{url}/adapters", json={"name": name, "path": str(path)})
    r.raise_for_status()


async def stream_timings(client: openai.AsyncOpenAI, model: str, prompt: str, tokens: int):
    """(seconds to the first token, decode tok/s after it, tokens) of one streamed request."""
    start = time.perf_counter()
    stream = await client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=tokens,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    first = last = None
    pieces = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            now = time.perf_counter()
            first = first or now
            last = now
            pieces += 1
    assert first is not None and last is not None
    decode = (tokens - 1) / (last - first) if last > first else float("nan")
    return first - start, decode, tokens


async def measure(url: str, target: str, paths: list[Path], tokens: int) -> dict[str, float]:
    n = len(paths)
    async with (
        openai.AsyncOpenAI(
            base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=1800
        ) as client,
        httpx.AsyncClient(timeout=1800) as http,
    ):
        for i, path in enumerate(paths):
            await register(http, url, target, f"ad{i}", path)
        # warm-up: every adapter once, so the figures see no first-use cost
        await asyncio.gather(*(stream_timings(client, f"ad{i}", PROMPT, 2) for i in range(n)))
        out: dict[str, float] = {}
        singles = [await stream_timings(client, "base", PROMPT, tokens) for _ in range(2)]
        out["single_tok_s"] = max(s[1] for s in singles)
        start = time.perf_counter()
        await asyncio.gather(*(stream_timings(client, f"ad{i}", PROMPT, tokens) for i in range(n)))
        out["streams_tok_s"] = n * tokens / (time.perf_counter() - start)
        # TTFT of a short request while n-1 long streams decode
        load = [
            asyncio.create_task(stream_timings(client, f"ad{i}", PROMPT, 3 * tokens))
            for i in range(1, n)
        ]
        await asyncio.sleep(0)
        ttfts = []
        for _ in range(3):
            await asyncio.sleep(1.0)
            ttfts.append((await stream_timings(client, "ad0", "Hello, my name is", 2))[0])
        await asyncio.gather(*load)
        out["ttft_under_load_s"] = statistics.median(ttfts)
        # registration of a new adapter to its first token, idle server
        fresh = paths[0].parent / "fresh"
        started_at = time.perf_counter()
        await register(http, url, target, "fresh", fresh)
        await stream_timings(client, "fresh", "Hello", 1)
        out["register_to_first_token_s"] = time.perf_counter() - started_at
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--targets", default="hf,vllm,vllm-plain")
    parser.add_argument("--out", type=Path, default=ROOT / "loadtests/results/bench_engines")
    args = parser.parse_args()
    targets = args.targets.split(",")
    model = resolve_base_model(None)  # the bundled model, converted once
    base_name = bundled_model_id(model) or model.name
    config = json.loads((model / "config.json").read_text())
    shapes = linear_shapes_from_config(config.get("text_config", config))
    work = Path(tempfile.mkdtemp(prefix="bench-engines-"))
    atexit.register(shutil.rmtree, work, True)
    paths = [
        random_lora_adapter(work / f"ad{i}", shapes, r=16, seed=i, base_name=base_name)
        for i in range(args.streams)
    ]
    random_lora_adapter(work / "fresh", shapes, r=16, seed=99, base_name=base_name)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, float]] = {}
    for target in targets:
        print(f"{target}: starting", flush=True)
        with started(target, model, args.streams, args.out / f"{target}.log") as url:
            results[target] = asyncio.run(measure(url, target, paths, args.tokens))
        print(f"  {target}: {results[target]}", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))

    rows = [
        ("single stream decode, tok/s", "single_tok_s", "{:.2f}"),
        (f"{args.streams} streams over {args.streams} adapters, tok/s", "streams_tok_s", "{:.2f}"),
        (f"TTFT beside {args.streams - 1} streams, s", "ttft_under_load_s", "{:.2f}"),
        ("POST adapter to first token, s", "register_to_first_token_s", "{:.2f}"),
    ]
    print(
        f"\n{base_name} on {os.cpu_count()} CPU cores; {args.tokens} tokens per "
        f"stream, rank-16 adapters on every linear layer\n"
    )
    print("| figure | " + " | ".join(targets) + " |")
    print("| --- |" + " --- |" * len(targets))
    for label, key, fmt in rows:
        print(f"| {label} | " + " | ".join(fmt.format(results[t][key]) for t in targets) + " |")
    if "vllm" in results and "vllm-plain" in results:
        ours, plain = results["vllm"], results["vllm-plain"]
        print(
            "\nswapserve on vLLM / plain vLLM (throughput goal >= 0.9; lower is better for times)"
        )
        for label, key, _ in rows:
            print(f"  {label}: {ours[key] / plain[key]:.2f}")


if __name__ == "__main__":
    main()
