"""`swapserve ab run QUESTIONS.jsonl --arm name=model[,rag=collection] ... --server URL`:
post an experiment to a running server, show progress, print the table, save the report.

`swapserve ab export SPLIT --format kto|dpo --out FILE`: an online split's feedback as the
training file `swapserve train kto` (or `dpo`) reads; nothing is written when there is none."""

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

    headers = _headers(args)
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


def _headers(args: argparse.Namespace) -> dict[str, str]:
    key = args.api_key or os.environ.get("SWAPSERVE_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def export(args: argparse.Namespace) -> int:
    import httpx

    from trainer.atomic import write_bytes_atomic

    path = "kto.jsonl" if args.format == "kto" else "preferences.jsonl"
    with httpx.Client(base_url=args.server, headers=_headers(args), timeout=60) as client:
        r = client.get(f"/ab/splits/{args.split}/{path}")
    if r.status_code != 200:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text
        print(f"error: {r.status_code}: {message} (nothing written)", file=sys.stderr)
        return 1
    lines = [json.loads(x) for x in r.text.splitlines() if x.strip()]
    # a crash or a full disk leaves the old file or the new one, never half an export
    write_bytes_atomic(args.out, r.content)
    if args.format == "kto":
        liked = sum(1 for line in lines if line["label"])
        what = f"{len(lines)} rated answers ({liked} liked, {len(lines) - liked} disliked)"
    else:
        what = f"{len(lines)} preference pairs"
    left_out = int(r.headers.get("X-Swapserve-Left-Out", "0"))
    note = f"; {left_out} left out (see the server log)" if left_out else ""
    print(f"{args.out}: {what} from split {args.split}{note}", file=sys.stderr)
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
    e = actions.add_parser(
        "export", help="write an online split's feedback as training data (KTO or DPO)"
    )
    e.add_argument("split", help="the split's name (its model is ab:<split>)")
    e.add_argument(
        "--format",
        choices=("kto", "dpo"),
        default="kto",
        help="kto: every rated answer {prompt, completion, label} (default); "
        "dpo: {prompt, chosen, rejected} pairs",
    )
    e.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    e.add_argument("--server", default="http://127.0.0.1:8000")
    e.add_argument("--api-key", help="admin key (default: $SWAPSERVE_API_KEY)")
    e.set_defaults(func=export)
