"""`swapserve ab run QUESTIONS.jsonl --arm name=model[,rag=collection] ... --server URL`:
post an experiment to a running server, show progress, print the table, save the report."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def parse_arm(text: str) -> dict[str, Any]:
    """`name=model[,rag=collection]` -> an arm of POST /ab/experiments."""
    head, *opts = text.split(",")
    name, sep, model = head.partition("=")
    if not sep or not name or not model:
        raise argparse.ArgumentTypeError(f"--arm {text!r}: expected name=model[,rag=collection]")
    arm: dict[str, Any] = {"name": name, "model": model}
    for opt in opts:
        key, _, value = opt.partition("=")
        if key == "rag" and value:
            arm["rag"] = {"collection": value}
        elif key == "temperature":
            arm["temperature"] = float(value)
        elif key == "max_tokens":
            arm["max_tokens"] = int(value)
        else:
            raise argparse.ArgumentTypeError(f"--arm {text!r}: unknown option {key!r}")
    return arm


def _read_questions(path: Path) -> list[dict[str, Any]]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise SystemExit(f"{path}:{n}: malformed JSON: {exc.msg}") from exc
    return out


def _table(exp: dict[str, Any]) -> str:
    rows = [("arm", "EM", "F1", "ROUGE-L", "TTFT s", "p50 s", "p95 s", "errors")]
    for name, a in exp["summary"]["arms"].items():
        s = a["scores"]
        rows.append(
            (
                name,
                f"{s['exact_match']['mean']:.3f}",
                f"{s['token_f1']['mean']:.3f}",
                f"{s['rouge_l']['mean']:.3f}",
                f"{a['ttft_s']['mean']:.3f}",
                f"{a['latency_s']['p50']:.3f}",
                f"{a['latency_s']['p95']:.3f}",
                str(a["errors"]),
            )
        )
    for c in exp["summary"]["comparisons"]:
        f1 = c["token_f1"]
        rows.append(
            (f"{c['arm']}-{c['baseline']} F1", f"{f1['diff']:+.3f}",
             f"[{f1['low']:+.3f},{f1['high']:+.3f}]", "", "", "", "", "")
        )  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def run(args: argparse.Namespace) -> int:
    import httpx
    from tqdm import tqdm

    headers = {}
    key = args.api_key or os.environ.get("SWAPSERVE_API_KEY")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    body: dict[str, Any] = {"questions": _read_questions(args.questions), "arms": args.arm or []}
    for field in ("name", "adapter", "collection", "max_tokens"):
        if getattr(args, field) is not None:
            body[field] = getattr(args, field)
    with httpx.Client(base_url=args.server, headers=headers, timeout=60) as client:
        r = client.post("/ab/experiments", json=body)
        if r.status_code != 202:
            print(f"error: {r.status_code} {r.text}", file=sys.stderr)
            return 1
        exp = r.json()
        with tqdm(total=exp["progress"]["total"], unit="q", file=sys.stderr) as bar:
            while exp["status"] == "running":
                time.sleep(args.poll)
                exp = client.get(f"/ab/experiments/{exp['id']}").json()
                bar.update(exp["progress"]["done"] - bar.n)
        if exp["status"] != "completed":
            print(f"experiment {exp['id']} {exp['status']}: {exp.get('error')}", file=sys.stderr)
            return 1
        print(_table(exp))
        budget = exp.get("budget")
        if budget:
            print(
                f"max_tokens {budget['max_tokens']} for {', '.join(budget['arms'])}: the longest "
                f"reference ({budget['longest_reference_tokens']} tokens) + {budget['margin']}, "
                f"at most {budget['cap']} (give --max-tokens or an arm's max_tokens to change it)"
            )
        if args.out:
            args.out.write_text(client.get(f"/ab/experiments/{exp['id']}/report").text)
            print(f"report: {args.out}", file=sys.stderr)
    return 0


def add_parser(sub: Any) -> None:
    ab = sub.add_parser("ab", help="A/B experiments against a running server")
    actions = ab.add_subparsers(dest="action", required=True)
    p = actions.add_parser("run", help="run an offline experiment and write its report")
    p.add_argument("questions", type=Path, help='JSONL: {"id"?, "question", "references"}')
    p.add_argument(
        "--arm",
        action="append",
        type=parse_arm,
        help="name=model[,rag=collection][,temperature=T][,max_tokens=N] (repeatable)",
    )
    p.add_argument("--adapter", help="without --arm: build base/adapter(+rag) arms")
    p.add_argument("--collection", help="without --arm: add +rag arms on this collection")
    p.add_argument("--name")
    p.add_argument("--max-tokens", type=int, dest="max_tokens")
    p.add_argument("--server", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", help="admin key (default: $SWAPSERVE_API_KEY)")
    p.add_argument("--out", type=Path, help="write the HTML report here")
    p.add_argument("--poll", type=float, default=1.0, help=argparse.SUPPRESS)
    p.set_defaults(func=run)
