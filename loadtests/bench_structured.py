"""Constrained decoding's cost on the bundled model, every figure a ratio measured in one run.

    python loadtests/bench_structured.py [--tokens 32] [--streams 8] [--runs 4]

a) 8 streams over 8 adapters, every row under a JSON schema (`response_format`
   json_schema) / the same streams decoding freely                          (goal >= 0.8)
b) the same streams, every row a forced tool call (`tool_choice` naming a function whose
   parameters are that schema) / the same tools offered with `tool_choice: "auto"`,
   decoded freely (the same prompt, whatever the template does with tools) (goal >= 0.8)
c) the grammar compile time of that schema and of the tool call's grammar: first compile
   (cold) and again (cached), and the first token mask, with the server's own compiler
   and the model's vocabulary

Same chat messages, same adapters, same number of tokens in every row (the schema asks for
more items than `--tokens` can hold, so every constrained row ends by length, as the free
rows do with `ignore_eos`). The kinds run in turns, `--runs` times, every other run in
reverse order, so a busy machine slows all of them alike. a) and b) are given twice:
tokens per second of wall time, and tokens per CPU-second the server process spent (which
moves less when other work shares the cores). The server runs as a child process; the
compile times are measured in this process after it stops.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import openai  # noqa: E402
import psutil  # noqa: E402

from loadtests._adapters import linear_shapes_from_config, random_lora_adapter  # noqa: E402
from loadtests._server import BENCH_BASE, server_process  # noqa: E402
from trainer.base_model import resolve_base_model  # noqa: E402

MESSAGES = [{"role": "user", "content": "List the people who work in our office, as JSON."}]

# A typical schema: nested objects in an array, strings, bounded integers, an enum.
# minItems is more than any --tokens can fill: rows end by length, as the free ones do.
SCHEMA = {
    "type": "object",
    "properties": {
        "office": {"type": "string", "maxLength": 32},
        "people": {
            "type": "array",
            "minItems": 100,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "age": {"type": "integer", "minimum": 18, "maximum": 99},
                    "role": {"enum": ["engineer", "manager", "designer", "intern"]},
                },
                "required": ["name", "age", "role"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["office", "people"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "staff", "schema": SCHEMA}}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "record_staff",
            "description": "Record the people of an office.",
            "parameters": SCHEMA,
        },
    }
]
TOOL_CHOICE = {"type": "function", "function": {"name": "record_staff"}}
# name -> (request fields, the free run it is compared with). A chat template may show the
# tools to the model (Gemma's does; the prompt then grows), so a forced call is compared with
# the same tools offered in "auto" mode: the same prompt, decoded freely.
KINDS = {
    "free": ({}, None),
    "json_schema": ({"response_format": RESPONSE_FORMAT}, "free"),
    "tools_auto": ({"tools": TOOLS, "tool_choice": "auto"}, None),
    "tool_call": ({"tools": TOOLS, "tool_choice": TOOL_CHOICE}, "tools_auto"),
}


@dataclass
class Measured:
    tokens: int  # completion tokens of all rows
    wall_s: float
    cpu_s: float  # CPU time the server process spent meanwhile (all its threads)
    not_length: int  # rows that ended before max_tokens
    prompt_tokens: int  # of one row


async def throughput(
    url: str, server_cpu: Callable[[], float], models: list[str], tokens: int, kind: str
) -> Measured:
    """Concurrent chat streams, one per entry of `models`."""
    fields = KINDS[kind][0]
    async with openai.AsyncOpenAI(
        base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=900
    ) as client:

        async def one(model: str) -> tuple[int, str, int]:
            r = await client.chat.completions.create(
                model=model,
                messages=MESSAGES,
                max_tokens=tokens,
                temperature=0,
                extra_body={"ignore_eos": True},
                **fields,
            )
            return r.usage.completion_tokens, r.choices[0].finish_reason, r.usage.prompt_tokens

        cpu, start = server_cpu(), time.perf_counter()
        done = await asyncio.gather(*(one(m) for m in models))
        wall, cpu = time.perf_counter() - start, server_cpu() - cpu
    return Measured(
        tokens=sum(n for n, _, _ in done),
        wall_s=wall,
        cpu_s=cpu,
        not_length=sum(f != "length" for _, f, _ in done),
        prompt_tokens=done[0][2],
    )


def compile_times(base_path: Path) -> dict[str, float]:
    """Milliseconds: the vocabulary's one-off setup, then each grammar cold and cached."""
    from transformers import AutoTokenizer

    from server.engine.base import StructuredOutput
    from server.engine.grammar import GrammarCompiler, new_bitmask
    from server.engine.token_bytes import token_bytes_table
    from server.serving import tools

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    config = json.loads((base_path / "config.json").read_text())
    table = token_bytes_table(tokenizer, config["vocab_size"])
    compiler = GrammarCompiler(
        lambda: table,
        lambda text: tokenizer.encode(text, add_special_tokens=False),
        eos_token_id=int(tokenizer.eos_token_id),
    )
    out: dict[str, float] = {}
    start = time.perf_counter()
    compiler.compile(StructuredOutput(json_object=True))  # teaches it the vocabulary
    out["vocabulary + JSON mode"] = (time.perf_counter() - start) * 1000
    specs = {
        "json_schema": StructuredOutput(json_schema=SCHEMA),
        "tool_call": tools.plan(TOOLS, TOOL_CHOICE, None).grammar,
    }
    for name, spec in specs.items():
        for when in ("cold", "cached"):
            start = time.perf_counter()
            row = compiler.compile(spec)
            out[f"{name} compile, {when}"] = (time.perf_counter() - start) * 1000
        # the first mask: llguidance builds parts of the lexer lazily, on first use
        bitmask = new_bitmask(1, len(table[0]))
        start = time.perf_counter()
        row.fill_mask(bitmask, 0)
        out[f"{name} first mask"] = (time.perf_counter() - start) * 1000
    assert compiler.cache_hits == 2, compiler.cache_hits
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--runs", type=int, default=4)
    args = parser.parse_args()
    n, tokens = args.streams, args.tokens

    base_path = resolve_base_model(BENCH_BASE)
    shapes = linear_shapes_from_config(json.loads((base_path / "config.json").read_text()))
    work = Path(tempfile.mkdtemp(prefix="swapserve-bench-"))
    atexit.register(shutil.rmtree, work, True)
    env = {
        "SWAPSERVE_DATA_DIR": str(work / "data"),
        "SWAPSERVE_MAX_LORAS": str(n),
        "SWAPSERVE_MAX_NUM_SEQS": str(max(16, n)),
    }
    models = [f"ad{i}" for i in range(n)]
    runs: dict[str, list[Measured]] = {k: [] for k in KINDS}
    with server_process(env) as (url, proc):
        server = psutil.Process(proc.pid)

        def server_cpu() -> float:
            t = server.cpu_times()
            return t.user + t.system

        for i, name in enumerate(models):
            path = random_lora_adapter(
                work / name, shapes, r=16, seed=i, scale=0.05, base_name=base_path.name
            )
            r = httpx.post(f"{url}/adapters", json={"name": name, "path": str(path)}, timeout=600)
            r.raise_for_status()
        for kind in KINDS:  # warm-up: the vocabulary, both grammars, every adapter resident
            asyncio.run(throughput(url, server_cpu, models, 2, kind))
        for run in range(args.runs):
            # every other run in reverse order (ABBA): a machine that slows down or speeds
            # up during the run favours no kind
            for kind in list(KINDS)[:: -1 if run % 2 else 1]:
                m = asyncio.run(throughput(url, server_cpu, models, tokens, kind))
                runs[kind].append(m)
                print(
                    f"run {run + 1}: {kind:12s} {m.tokens / m.wall_s:6.2f} tok/s, "
                    f"{m.tokens / m.cpu_s:6.2f} tok per server CPU-s",
                    flush=True,
                )
    times = compile_times(base_path)

    def rate(kind: str, clock: str) -> float:
        ms = runs[kind]
        return sum(m.tokens for m in ms) / sum(getattr(m, clock) for m in ms)

    print(
        f"\n{BENCH_BASE}, NF4, CPU; {n} streams over {n} adapters x {tokens} tokens, "
        f"{args.runs} runs"
    )
    for kind, (_, baseline) in KINDS.items():
        if baseline is None:
            continue
        pairs = ", ".join(
            f"{(c.tokens / c.wall_s) / (f.tokens / f.wall_s):.2f}"
            for c, f in zip(runs[kind], runs[baseline], strict=True)
        )
        wall = rate(kind, "wall_s"), rate(baseline, "wall_s")
        cpu = rate(kind, "cpu_s"), rate(baseline, "cpu_s")
        print(
            f"{kind} / {baseline} (prompts of {runs[kind][0].prompt_tokens} and "
            f"{runs[baseline][0].prompt_tokens} tokens), goal >= 0.8:\n"
            f"  tok/s            {wall[0]:.2f} / {wall[1]:.2f} = {wall[0] / wall[1]:.2f} "
            f"(per run {pairs})\n"
            f"  tok/server CPU-s {cpu[0]:.2f} / {cpu[1]:.2f} = {cpu[0] / cpu[1]:.2f}"
        )
    for kind, ms in runs.items():
        if early := sum(m.not_length for m in ms):
            print(f"note: {early} {kind} rows ended before max_tokens (not by length)")
    print("grammar (ms):")
    for name, ms in times.items():
        print(f"  {name:28s} {ms:8.2f}")


if __name__ == "__main__":
    main()
