"""TTFT of a short request while a long one decodes, with the newcomer's prefill inside the
decode step under way and without it, as ratios to the idle TTFT, in one run.

    python loadtests/bench_ttft.py [--rounds 5]

On the bundled Gemma 3 270M as the server builds it (server/engine/factory.py), in this
process (no HTTP: what is measured is the scheduler's share). Each round measures an idle
TTFT, then three short requests sent as a token of a long stream arrives (so just as a
decode step starts), once with the fast runner's between-layers prefill on and once off
(``preempts_decode``, server/engine/scheduler.py), in turns, so that a busy machine slows
both alike. loadtests/bench_adapters.py c) measures the same through the HTTP server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests._server import BENCH_BASE  # noqa: E402
from loadtests.bench_adapters import PROMPT  # noqa: E402
from server.engine.base import GenerationRequest, SamplingParams  # noqa: E402

SHORT = "Hello, my name is"
ARRIVAL_S = 0.005


async def measure(rounds: int) -> None:
    from server.config import Settings
    from server.engine.factory import build_engine

    # the user's own data directory is never touched; nothing downloads
    scratch = tempfile.TemporaryDirectory(prefix="swapserve-bench-")
    os.environ.update(
        HF_HUB_OFFLINE="1", SWAPSERVE_BASE_MODEL=BENCH_BASE, SWAPSERVE_DATA_DIR=scratch.name
    )
    engine = build_engine(Settings())
    await engine.start()
    runner = engine.runner  # type: ignore[attr-defined]
    if not getattr(runner, "preempts_decode", False):
        sys.exit(f"the {runner.kind} runner has no between-layers prefill: nothing to compare")

    def request(text: str, tokens: int) -> GenerationRequest:
        return GenerationRequest(
            request_id="bench",
            prompt_token_ids=engine.tokenize(text),
            sampling=SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True),
        )

    async def ttft() -> float:
        start = time.perf_counter()
        first = None
        async for out in engine.generate(request(SHORT, 4)):
            if first is None and out.token_ids:
                first = time.perf_counter()
        return ((first or time.perf_counter()) - start) * 1000

    for _ in range(3):
        await ttft()  # warm-up
    ms: dict[str, list[float]] = {"idle": [], "on": [], "off": []}
    try:
        for r in range(rounds):
            for mode in ("on", "off"):
                ms["idle"].append(await ttft())
                runner.preempts_decode = mode == "on"
                stream = engine.generate(request(PROMPT * 4, 96))
                seen = 0
                loaded: list[float] = []
                async for out in stream:
                    seen += bool(out.token_ids)
                    if seen == 3:
                        # a few ms on, as a request over HTTP would come: inside the step
                        # now under way (at once, it can race the step and be admitted
                        # before it starts)
                        await asyncio.sleep(ARRIVAL_S)
                        loaded.append(await ttft())
                        seen = 0
                    if len(loaded) == 3:
                        break
                await stream.aclose()
                ms[mode] += loaded
            print(
                f"round {r + 1}: idle {statistics.median(ms['idle'][-2:]):.0f} ms, "
                f"under load: on {statistics.median(ms['on'][-3:]):.0f} ms, "
                f"off {statistics.median(ms['off'][-3:]):.0f} ms",
                flush=True,
            )
    finally:
        runner.preempts_decode = True
        await engine.shutdown()
        scratch.cleanup()
    idle = statistics.median(ms["idle"])
    for mode in ("on", "off"):
        m = statistics.median(ms[mode])
        print(
            f"prefill inside the step {mode:>3}: TTFT under load / idle = {m:.0f} / {idle:.0f} ms"
            f" = {m / idle:.2f}  (medians of {len(ms[mode])} and {len(ms['idle'])})"
        )
    on, off = statistics.median(ms["on"]), statistics.median(ms["off"])
    print(f"TTFT under load, prefill inside the step on / off: {on / off:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(measure(args.rounds))


if __name__ == "__main__":
    main()
