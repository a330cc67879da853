"""Run the locust scenario against a fresh swapserve on the bundled model, and summarise.

    python loadtests/run_loadtest.py [--users 4] [--duration 90] [--adapters 4]
    python loadtests/run_loadtest.py --steps 2,4,8 --step-duration 45   # what breaks first

Starts `swapserve serve` (data dir in a temp folder, SWAPSERVE_MAX_NUM_SEQS sized to the
users), writes random rank-8 LoRA adapters and registers them, creates a small RAG
collection when the server has RAG routes, runs locust headless for a bounded time, stops
the server and prints requests/s, error rate, p50/p95 time to first token and tokens/s.
locust's CSV files and HTML report land in loadtests/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from loadtests._adapters import linear_shapes_from_config, random_lora_adapter  # noqa: E402
from loadtests._server import BENCH_BASE, running_server  # noqa: E402
from trainer.base_model import resolve_base_model  # noqa: E402

HERE = Path(__file__).resolve().parent
LOCUSTFILE = HERE / "locustfile.py"
HTTP_METHODS = {"GET", "POST", "PUT", "DELETE", "PATCH"}
RAG_COLLECTION = "loadtest-docs"
RAG_DOCUMENTS = [
    "The lighthouse at Cape Wren was built in 1871 and is painted in red and white bands.",
    "Swapserve keeps one 4-bit base model resident and serves many LoRA adapters per request.",
    "A paperclip can hold papers together, reset small electronics, or act as a zipper pull.",
    "Paris, the capital of France, is known for the Louvre, cafes and the Seine river.",
]


@dataclass
class Summary:
    users: int
    requests: int
    failures: int
    rps: float
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    tokens_per_s: float
    stream_tok_s_p50: float | None
    top_failures: list[tuple[str, int]]

    @property
    def error_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


def make_adapters(root: Path, count: int) -> list[Path]:
    """`count` random adapters plus one spare (the last) for the register/unregister task."""
    base_path = resolve_base_model(BENCH_BASE)
    config = json.loads((base_path / "config.json").read_text())
    shapes = linear_shapes_from_config(config.get("text_config", config))
    # scale 0.01 keeps the deltas small, so adapted outputs stay text-like
    return [
        random_lora_adapter(
            root / f"lt-{i}", shapes, r=8, seed=i, scale=0.01, base_name=base_path.name
        )
        for i in range(count + 1)
    ]


def register(url: str, paths: list[Path]) -> list[str]:
    names = []
    for path in paths:
        r = httpx.post(f"{url}/adapters", json={"name": path.name, "path": str(path)}, timeout=120)
        r.raise_for_status()
        names.append(path.name)
    return names


def setup_rag(url: str) -> str | None:
    """A small collection through the HTTP API, or None when this server has no RAG routes."""
    try:
        if httpx.get(f"{url}/rag/collections", timeout=10).status_code == 404:
            return None
        r = httpx.post(f"{url}/rag/collections", json={"name": RAG_COLLECTION}, timeout=120)
        if r.status_code not in (201, 409):
            print(f"RAG: creating the collection failed ({r.status_code}): {r.text[:200]}")
            return None
        r = httpx.post(
            f"{url}/rag/collections/{RAG_COLLECTION}/documents",
            json={"documents": [{"text": t} for t in RAG_DOCUMENTS]},
            timeout=600,  # the first ingest loads the embedding model
        )
        if r.status_code >= 300:
            print(f"RAG: ingesting failed ({r.status_code}): {r.text[:200]}")
            return None
    except httpx.HTTPError as exc:
        print(f"RAG: skipped ({exc!r})")
        return None
    return RAG_COLLECTION


def run_locust(
    url: str,
    *,
    users: int,
    spawn_rate: float,
    duration_s: int,
    stop_timeout_s: int,
    prefix: Path,
    env: dict[str, str],
    html: Path | None,
) -> None:
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "-u",
        str(users),
        "-r",
        str(spawn_rate),
        "-t",
        f"{duration_s}s",
        "--host",
        url,
        "--csv",
        str(prefix),
        "--exit-code-on-error",
        "0",
        "--stop-timeout",
        str(stop_timeout_s),
        "--only-summary",
        "--loglevel",
        "WARNING",
    ]
    if html is not None:
        cmd += ["--html", str(html)]
    log = prefix.with_suffix(".log")
    with log.open("w") as out:
        # A hard bound above locust's own: the run must end by itself even if locust hangs.
        subprocess.run(
            cmd,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=duration_s + stop_timeout_s + 120,
            check=True,
        )


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no samples."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def summarise(path: Path, users: int) -> Summary:
    """Read the JSON the locustfile writes at test_stop (after in-flight requests drained)."""
    data = json.loads(path.read_text())
    http = [r for r in data["rows"] if r["type"] in HTTP_METHODS]
    requests = sum(r["requests"] for r in http)
    elapsed = data["elapsed_s"]
    errors = sorted(data["errors"], key=lambda e: -e["count"])
    return Summary(
        users=users,
        requests=requests,
        failures=sum(r["failures"] for r in http),
        rps=requests / elapsed,
        ttft_p50_ms=percentile(data["ttft_ms"], 0.5),
        ttft_p95_ms=percentile(data["ttft_ms"], 0.95),
        tokens_per_s=data["completion_tokens"] / elapsed,
        stream_tok_s_p50=percentile(data["tok_s"], 0.5),
        top_failures=[(f"{e['type']} {e['name']}: {e['error'][:120]}", e["count"]) for e in errors][
            :5
        ],
    )


def print_summary(s: Summary) -> None:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f} ms"

    print(
        f"users={s.users}: {s.requests} requests, {s.rps:.2f} req/s, "
        f"error rate {s.error_rate:.1%} ({s.failures}), "
        f"TTFT p50 {ms(s.ttft_p50_ms)} p95 {ms(s.ttft_p95_ms)}, "
        f"{s.tokens_per_s:.1f} completion tok/s aggregate, "
        f"per-request tok/s p50 {s.stream_tok_s_p50 or 0:.1f}"
    )
    for what, n in s.top_failures:
        print(f"    {n} x {what}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--spawn-rate", type=float, default=2.0)
    ap.add_argument("--duration", type=int, default=90, help="seconds of load")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--max-tokens", default="16,32", help="lo,hi drawn per request")
    ap.add_argument("--stop-timeout", type=int, default=60, help="seconds to finish in-flight")
    ap.add_argument("--steps", default="", help="e.g. 2,4,8: one short run per user count")
    ap.add_argument("--step-duration", type=int, default=45)
    ap.add_argument("--max-queue", type=int, default=None, help="SWAPSERVE_MAX_QUEUE")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args()

    steps = [int(s) for s in args.steps.split(",") if s] if args.steps else []
    args.results.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="swapserve-loadtest-") as tmp:
        root = Path(tmp)
        paths = make_adapters(root / "adapters", args.adapters)
        server_env = {
            "SWAPSERVE_DATA_DIR": str(root / "data"),
            # one decode row per user: batching, not the queue, should absorb the load
            "SWAPSERVE_MAX_NUM_SEQS": str(max([args.users, *steps])),
        }
        if args.max_queue is not None:
            server_env["SWAPSERVE_MAX_QUEUE"] = str(args.max_queue)
        summaries: list[Summary] = []
        with running_server(server_env) as url:
            names = register(url, paths[:-1])
            collection = setup_rag(url)
            print(
                f"server {url}: adapters {', '.join(names)}; "
                f"RAG {'collection ' + collection if collection else 'routes absent, skipped'}"
            )
            env = {
                "SWAPSERVE_LT_ADAPTERS": ",".join(["base", *names]),
                "SWAPSERVE_LT_SPARE_PATH": str(paths[-1]),
                "SWAPSERVE_LT_MAX_TOKENS": args.max_tokens,
            }
            if collection:
                env["SWAPSERVE_LT_RAG_COLLECTION"] = collection
            plan = [(u, args.step_duration, f"step_u{u}") for u in steps] or [
                (args.users, args.duration, "loadtest")
            ]
            for users, duration, label in plan:
                prefix = args.results / label
                env["SWAPSERVE_LT_SUMMARY"] = f"{prefix}_summary.json"
                print(f"locust: {users} users for {duration} s ...", flush=True)
                run_locust(
                    url,
                    users=users,
                    spawn_rate=max(args.spawn_rate, users / 5),
                    duration_s=duration,
                    stop_timeout_s=args.stop_timeout,
                    prefix=prefix,
                    env=env,
                    html=args.results / ("report.html" if not steps else f"report_u{users}.html"),
                )
                summaries.append(summarise(Path(f"{prefix}_summary.json"), users))
                print_summary(summaries[-1])
    print(f"\nsummary (max_tokens {args.max_tokens}, {args.adapters} adapters + base):")
    for s in summaries:
        print_summary(s)
    print(f"CSV and HTML reports in {args.results}")


if __name__ == "__main__":
    main()
