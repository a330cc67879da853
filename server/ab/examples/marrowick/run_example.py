"""The A/B example end to end: retrieval vs fine-tuning vs both, on knowledge no model has seen.

Marrowick is an invented island (kb/: 12 short Markdown notes). The script, on the bundled
Gemma 3 270M (NF4) and nothing else (SWAPSERVE_BASE_MODEL names another base, e.g.
smollm2-135m-instruct; the results/ here are Gemma's):

1. ingests kb/ into a collection             `swapserve rag ingest marrowick kb/*.md --create`
2. builds RAFT data from train_questions.jsonl `swapserve rag raft marrowick ...`
   (paraphrases of the evaluation questions, so the experiment does not ask the adapter
   the exact sentences it was trained on)
3. trains a QLoRA SFT adapter on it            `swapserve train sft --data raft.jsonl ...`
4. starts the server, registers the adapter  (`POST /adapters`)
5. runs the four arms (base, base+rag, adapter, adapter+rag) on questions.jsonl through
   `POST /ab/experiments`, prints the table, and writes the HTML report, its charts as
   SVG files and the summary as JSON into --results.

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python server/ab/examples/marrowick/run_example.py

Every step is the command a user would run; the script only strings them together. On 2
shared CPU cores it took 38 minutes, 32 of them training (--steps sets how many).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
COLLECTION = "marrowick"
ADAPTER = "marrowick-raft"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def swapserve(*args: str, env: dict[str, str]) -> None:
    """One `swapserve` command, its output shown as it runs; a failure stops the script."""
    cmd = [sys.executable, "-m", "server.cli", *args]
    log("$ swapserve " + " ".join(args))
    subprocess.run(cmd, env=env, check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    out = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--log-level", "INFO"],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"the server was not ready after 10 minutes; see {log_path}")


def run_experiment(
    url: str, questions: Path, max_tokens: int, top_k: int, stop: list[str]
) -> dict[str, Any]:
    from tqdm import tqdm

    rag = {"collection": COLLECTION, "top_k": top_k}
    gen = {"stop": stop} if stop else {}
    body = {
        "name": "marrowick: RAG vs RAFT adapter",
        "questions": [json.loads(line) for line in questions.read_text().splitlines() if line],
        "arms": [
            {"name": "base", "model": "base", **gen},
            {"name": "base+rag", "model": "base", "rag": rag, **gen},
            {"name": "adapter", "model": ADAPTER, **gen},
            {"name": "adapter+rag", "model": ADAPTER, "rag": rag, **gen},
        ],
        "max_tokens": max_tokens,
    }
    with httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/ab/experiments", json=body)
        if r.status_code != 202:
            raise SystemExit(f"POST /ab/experiments: {r.status_code} {r.text}")
        exp = r.json()
        with tqdm(total=exp["progress"]["total"], unit="q", desc="experiment") as bar:
            while exp["status"] == "running":
                time.sleep(2)
                exp = client.get(f"/ab/experiments/{exp['id']}").json()
                bar.update(exp["progress"]["done"] - bar.n)
        if exp["status"] != "completed":
            raise SystemExit(f"experiment {exp['id']} {exp['status']}: {exp.get('error')}")
        exp["report_html"] = client.get(f"/ab/experiments/{exp['id']}/report").text
    return exp


def _ci(d: dict[str, float], key: str = "mean") -> str:
    return f"{d[key]:.2f} [{d['low']:.2f}, {d['high']:.2f}]"


def markdown_table(exp: dict[str, Any]) -> str:
    arms = exp["summary"]["arms"]
    lines = [
        "| arm | exact match | token F1 | ROUGE-L | retrieval hit | TTFT mean | "
        "latency p50 / p95 | tokens in / out |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, a in arms.items():
        s = a["scores"]
        hit = a.get("retrieval_hit_rate")
        lines.append(
            f"| {name} | {_ci(s['exact_match'])} | {_ci(s['token_f1'])} | {_ci(s['rouge_l'])} "
            f"| {'-' if hit is None else f'{hit:.2f}'} | {a['ttft_s']['mean']:.1f} s "
            f"| {a['latency_s']['p50']:.1f} / {a['latency_s']['p95']:.1f} s "
            f"| {a['prompt_tokens']} / {a['completion_tokens']} |"
        )
    lines += ["", "| difference (paired bootstrap, 95%) | exact match | token F1 | ROUGE-L |"]
    lines.append("| --- | --- | --- | --- |")
    for c in exp["summary"]["comparisons"]:
        cells = " | ".join(
            f"{c[m]['diff']:+.2f} [{c[m]['low']:+.2f}, {c[m]['high']:+.2f}]"
            for m in ("exact_match", "token_f1", "rouge_l")
        )
        lines.append(f"| {c['arm']} - {c['baseline']} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--workdir", type=Path, help="data dir, RAFT data, adapter (default: a temp dir)"
    )
    p.add_argument("--results", type=Path, default=HERE / "results", help="table, charts, report")
    p.add_argument("--steps", type=int, default=40, help="SFT steps (default 40)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument(
        "--distractors",
        type=int,
        default=1,
        help="RAFT distractors; the +rag arms retrieve this many + 1 passages (default 1)",
    )
    p.add_argument("--max-tokens", type=int, default=16, help="answer budget per arm")
    p.add_argument(
        "--stop",
        action="append",
        default=None,
        help="stop sequence for every arm (repeatable; default: a newline, since answers are "
        "one line and the base model never learnt to end a turn); --stop '' for none",
    )
    p.add_argument("--closed-book", type=float, default=0.5, help="see `swapserve rag raft`")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    started = time.monotonic()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="swapserve-marrowick-"))
    work.mkdir(parents=True, exist_ok=True)
    data_dir = work / "data"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "SWAPSERVE_DATA_DIR": str(data_dir),
        # the trainer and the server read it: the adapter is trained on the base it is served on
        "SWAPSERVE_BASE_MODEL": os.environ.get("SWAPSERVE_BASE_MODEL") or "gemma3-270m",
    }
    log(f"working in {work}")
    timings: dict[str, float] = {}

    t = time.monotonic()
    kb = sorted(str(f) for f in (HERE / "kb").glob("*.md"))
    if not (data_dir / "rag" / COLLECTION / "meta.sqlite").is_file():
        swapserve("rag", "ingest", COLLECTION, *kb, "--create", env=env)
    raft = work / "raft.jsonl"
    swapserve(
        "rag", "raft", COLLECTION, str(HERE / "train_questions.jsonl"), "--out", str(raft),
        "--closed-book", str(args.closed_book), "--distractors", str(args.distractors),
        "--seed", str(args.seed), env=env,
    )  # fmt: skip
    timings["ingest + raft"] = time.monotonic() - t

    t = time.monotonic()
    adapter_dir = work / "adapter"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    swapserve(
        "train", "sft", "--data", str(raft), "--name", ADAPTER, "--output-dir", str(adapter_dir),
        "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
        "--lr", str(args.lr), "--max-length", "512", "--eval-fraction", "0",
        "--seed", str(args.seed), env=env,
    )  # fmt: skip
    timings["train"] = time.monotonic() - t

    t = time.monotonic()
    log("starting the server")
    proc, url = start_server(env, work / "server.log")
    try:
        timings["server start"] = time.monotonic() - t
        r = httpx.post(
            f"{url}/adapters",
            json={"name": ADAPTER, "path": str(adapter_dir), "replace": True},
            timeout=120,
        )
        if r.status_code not in (200, 201):
            raise SystemExit(f"POST /adapters: {r.status_code} {r.text}")
        log(f"registered {ADAPTER}; running the four arms on {url}")
        t = time.monotonic()
        stop = [s for s in (args.stop if args.stop is not None else ["\n"]) if s]
        exp = run_experiment(
            url, HERE / "questions.jsonl", args.max_tokens, args.distractors + 1, stop
        )
        timings["experiment"] = time.monotonic() - t
    finally:
        proc.terminate()
        proc.wait(30)

    args.results.mkdir(parents=True, exist_ok=True)
    report = exp.pop("report_html")
    (args.results / "report.html").write_text(report)
    svgs = re.findall(r"<svg.*?</svg>", report, flags=re.S)
    for name, svg in zip(("scores.svg", "latency.svg"), svgs, strict=False):
        (args.results / name).write_text(svg + "\n")
    card = json.loads((adapter_dir / "swapserve_card.json").read_text())
    table = markdown_table(exp)
    (args.results / "table.md").write_text(table + "\n")
    (args.results / "summary.json").write_text(
        json.dumps(
            {
                "experiment": exp["id"],
                "summary": exp["summary"],
                "training": {
                    k: card.get(k)
                    for k in ("hyperparameters", "data", "train", "wall_time_s")
                    if k in card
                },
                "timings_s": {k: round(v, 1) for k, v in timings.items()},
            },
            indent=1,
        )
        + "\n"
    )
    print()
    print(table)
    print()
    log(
        "timings: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
        + f"; total {time.monotonic() - started:.0f} s; results in {args.results}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
