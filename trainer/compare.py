"""Compare training methods on the user's own data: every method with the same objective,
data, steps and batch, one table and one HTML report.

    swapserve train compare --data train.jsonl --eval-file eval.jsonl \\
        --methods lora,qlora,ia3,prompt_tuning,prefix_tuning,ln_tuning,full --max-steps 20

Each method trains as its own job in its own process (``trainer.jobs.JobManager``), so its
peak memory is its own; jobs run one at a time. Every config is built and checked against
the base before the first job starts: a method that would be refused is refused up front.
The columns: trainable parameters (count and % of the base), adapter size on disk, peak
memory of the job, training and wall time, the eval (loss, token F1 and exact match of
greedy answers), and serving throughput: aggregate tokens/s of 8 concurrent streams on the
registered adapter, measured after every job has finished (``--server``, or the server
itself for ``POST /train/compare``). An adapter the server cannot serve yet shows why in
that column instead of a number.

The same record drives the CLI and the HTTP API (``server/train_compare.py``): its ``rows``
are computed here from the job records and the cards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from html import escape
from pathlib import Path
from typing import Any

from trainer.config import ConfigError, JobConfig

logger = logging.getLogger(__name__)

DEFAULT_METHODS = (
    "lora",
    "qlora",
    "ia3",
    "prompt_tuning",
    "prefix_tuning",
    "p_tuning",
    "ln_tuning",
    "full",
)
STREAMS = 8
SERVE_TOKENS = 32
# every target is measured this many times, in turns, and its median run is reported: one
# run of a few seconds each moved by 15 % with the order of measurement
SERVE_ROUNDS = 3
SERVE_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
# Fields that differ by method are not part of the shared budget.
NOT_SHARED = {"method", "quantization", "learning_rate", "eval_file"}


# --------------------------------------------------------------------------- configs


def parse_methods(value: str | list[str] | None) -> list[str]:
    from trainer.methods import get_method

    if value is None:
        return list(DEFAULT_METHODS)
    names = [s.strip() for s in value.split(",")] if isinstance(value, str) else list(value)
    names = [n for n in names if n]
    if not names:
        raise ConfigError("methods", "give at least one method")
    if len(set(names)) != len(names):
        raise ConfigError("methods", f"{names}: each method once")
    for n in names:
        try:
            get_method(n)
        except ConfigError as exc:
            raise ConfigError("methods", str(exc).split(": ", 1)[1]) from None
    return names


def job_name(prefix: str, method: str) -> str:
    return f"{prefix}-{method.replace('_', '-')}"


def method_configs(
    objective: str,
    methods: list[str],
    shared: dict[str, Any],
    per_method: dict[str, dict[str, Any]] | None = None,
) -> dict[str, JobConfig]:
    """One config per method: the shared budget, the method, its own defaults (learning
    rate, base precision) and any per-method overrides. ConfigError names the method."""
    from trainer.objectives import build_config

    per_method = per_method or {}
    unknown = sorted(set(per_method) - set(methods))
    if unknown:
        raise ConfigError("method_config", f"{', '.join(unknown)} not among the methods")
    fixed = sorted(set(shared) & {"method"})
    if fixed:
        raise ConfigError("config.method", "the methods are given by `methods`, not the config")
    out = {}
    for m in methods:
        fields = {**shared, **per_method.get(m, {}), "method": m}
        try:
            out[m] = build_config(objective, fields)
        except ConfigError as exc:
            raise ConfigError(exc.field, f"method {m}: {str(exc).split(': ', 1)[1]}") from None
    return out


# --------------------------------------------------------------------------- the table


def _card(record: dict[str, Any]) -> dict[str, Any] | None:
    from trainer.common import CARD_NAME

    if record.get("state") != "succeeded":
        return None
    try:
        return json.loads((Path(record["output_dir"]) / CARD_NAME).read_text())
    except (OSError, ValueError):
        return None


def _folder_bytes(path: str | Path) -> int | None:
    p = Path(path)
    if not p.is_dir():
        return None
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _serving(serving: dict[str, Any], name: str | None, registered: bool) -> tuple[Any, str]:
    if name is None:
        return None, ""
    got = serving.get(name)
    if got is None:
        return None, "" if registered else "not registered"
    return got.get("tok_s"), got.get("error") or ""


def rows(
    methods: list[str],
    names: dict[str, str],
    records: dict[str, dict[str, Any]],
    serving: dict[str, Any],
) -> list[dict[str, Any]]:
    """One row per method (two for full: the model and its extracted LoRA), then the base."""
    out: list[dict[str, Any]] = []
    base_row: dict[str, Any] | None = None
    for m in methods:
        record = records.get(m) or {}
        card = _card(record)
        name = names[m]
        registered = bool(record.get("registered"))
        row: dict[str, Any] = {
            "label": m,
            "method": m,
            "name": name,
            "state": record.get("state", "queued"),
            "error": record.get("error") or record.get("registration_error"),
            "registered": registered,
        }
        if card is None:
            out.append(row)
            continue
        params = card["method"]["parameters"] or {}
        ev = card.get("eval") or {}
        row.update(
            trainable=params.get("trainable"),
            trainable_pct=params.get("trainable_pct"),
            adapter_bytes=card.get("adapter_bytes"),
            peak_rss_bytes=(card.get("memory") or {}).get("peak_rss_bytes"),
            train_time_s=card["train"].get("train_time_s"),
            wall_time_s=card.get("wall_time_s"),
            steps=card["train"].get("steps"),
            learning_rate=card["hyperparameters"].get("learning_rate"),
            quantization=card["base_model"]["quantization"],
            eval_loss=(ev.get("eval_loss") or {}).get("adapter"),
            token_f1=(ev.get("adapter") or {}).get("token_f1"),
            exact_match=(ev.get("adapter") or {}).get("exact_match"),
        )
        extraction = card.get("extraction")
        if extraction:
            # the full model itself: its folder is the size, it serves as a base of its own
            row["adapter_bytes"] = _folder_bytes(extraction["model_dir"])
            row["serving_note"] = "a model folder: serve it as SWAPSERVE_BASE_MODEL"
            row["name"] = None
            out.append(row)
            ex = ev.get("extracted") or {}
            extracted = {
                "label": f"{m} -> LoRA (SVD, ranks {extraction['ranks']['min']}-"
                f"{extraction['ranks']['max']}, rel. error {extraction['relative_error']:.3f})",
                "method": m,
                "name": name,
                "state": row["state"],
                "error": record.get("registration_error"),
                "registered": registered,
                "trainable": card.get("adapter_parameters"),
                "trainable_pct": None,
                "adapter_bytes": card.get("adapter_bytes"),
                "eval_loss": ex.get("eval_loss"),
                "token_f1": (ex.get("adapter") or {}).get("token_f1"),
                "exact_match": (ex.get("adapter") or {}).get("exact_match"),
                "quantization": row["quantization"],
            }
            tok_s, note = _serving(serving, name, registered)
            extracted.update(serving_tok_s=tok_s, serving_note=note)
            out.append(extracted)
        else:
            tok_s, note = _serving(serving, name, registered)
            row.update(serving_tok_s=tok_s, serving_note=note)
            out.append(row)
        if ev.get("base") and (base_row is None or card["base_model"]["quantization"] == "nf4"):
            base_row = {
                "label": f"base ({card['base_model']['quantization']}, no training)",
                "method": None,
                "name": None,
                "state": "succeeded",
                "eval_loss": (ev.get("eval_loss") or {}).get("base"),
                "token_f1": ev["base"].get("token_f1"),
                "exact_match": ev["base"].get("exact_match"),
                "quantization": card["base_model"]["quantization"],
            }
    if base_row is not None:
        tok_s, note = _serving(serving, "__base__", True)
        base_row.update(serving_tok_s=tok_s, serving_note=note)
        out.append(base_row)
    return out


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _bytes(value: Any) -> str:
    if value is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value} B"


def _time(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value / 60:.1f} min" if value >= 120 else f"{value:.0f} s"


COLUMNS = (
    "method",
    "trainable params",
    "% of base",
    "size on disk",
    "peak RSS",
    "train time",
    "wall time",
    "eval loss",
    "token F1",
    "exact match",
    f"serving tok/s ({STREAMS} streams)",
)


def _cells(row: dict[str, Any]) -> list[str]:
    if row.get("state") != "succeeded":
        why = row.get("error") or row.get("state")
        return [f"`{row['label']}`", f"({row.get('state')}: {why})"] + [""] * (len(COLUMNS) - 2)
    tok_s = row.get("serving_tok_s")
    serve = f"{tok_s:.1f}" if tok_s is not None else (row.get("serving_note") or "-")
    return [
        f"`{row['label']}`",
        _num(row.get("trainable"), ","),
        _num(row.get("trainable_pct"), ".3f"),
        _bytes(row.get("adapter_bytes")),
        _bytes(row.get("peak_rss_bytes")),
        _time(row.get("train_time_s")),
        _time(row.get("wall_time_s")),
        _num(row.get("eval_loss"), ".3f"),
        _num(row.get("token_f1"), ".2f"),
        _num(row.get("exact_match"), ".2f"),
        serve,
    ]


def markdown(table_rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for row in table_rows:
        lines.append("| " + " | ".join(c.replace("|", "/") for c in _cells(row)) + " |")
    return "\n".join(lines)


def html_report(record: dict[str, Any]) -> str:
    """One self-contained page: the table, then a bar per method for the columns a reader
    compares (no scripts, no external assets)."""
    table_rows = record.get("rows") or []
    head = "".join(f"<th>{escape(c)}</th>" for c in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(c.strip('`'))}</td>" for c in _cells(r)) + "</tr>"
        for r in table_rows
    )
    charts = []
    for key, title, fmt in (
        ("trainable_pct", "Trainable parameters, % of the base", "{:.3f}%"),
        ("adapter_bytes", "Size on disk, bytes", "{:,.0f}"),
        ("peak_rss_bytes", "Peak memory of the job (RSS), bytes", "{:,.0f}"),
        ("train_time_s", "Training time, s", "{:.0f}"),
        ("eval_loss", "Eval loss (lower is better)", "{:.3f}"),
        ("token_f1", "Token F1 of greedy answers", "{:.2f}"),
        ("exact_match", "Exact match", "{:.2f}"),
        ("serving_tok_s", f"Serving tokens/s, {STREAMS} streams", "{:.1f}"),
    ):
        values = [(r["label"], r.get(key)) for r in table_rows if r.get(key) is not None]
        if not values:
            continue
        top = max(v for _, v in values) or 1.0
        bars = "".join(
            f'<div class="bar"><span class="name">{escape(label)}</span>'
            f'<span class="fill" style="width:{max(0.5, 100 * v / top):.1f}%"></span>'
            f'<span class="value">{escape(fmt.format(v))}</span></div>'
            for label, v in values
        )
        charts.append(f"<h2>{escape(title)}</h2>{bars}")
    meta = escape(
        f"objective {record.get('objective')}, {len(record.get('methods', []))} methods, "
        f"shared budget {json.dumps(record.get('budget', {}))}, data sha256 "
        f"{str(record.get('data_sha256'))[:16]}"
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>swapserve: method comparison {escape(str(record.get("id")))}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1100px; }}
table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
.bar {{ display: flex; align-items: center; font-size: 13px; margin: 2px 0; }}
.bar .name {{ width: 360px; }}
.bar .fill {{ display: inline-block; height: 14px; background: #4e79a7; margin-right: 8px; }}
h2 {{ font-size: 15px; margin-top: 1.5em; }}
</style></head><body>
<h1>Training methods compared on your data</h1>
<p>{meta}</p>
<table><tr>{head}</tr>{body}</table>
{"".join(charts)}
</body></html>
"""


# --------------------------------------------------------------------------- serving probe


async def serving_throughput(
    url: str,
    model: str,
    *,
    streams: int = STREAMS,
    max_tokens: int = SERVE_TOKENS,
    api_key: str | None = None,
) -> dict[str, Any]:
    """Aggregate completion tokens/s of ``streams`` concurrent chat streams on ``model``
    (``ignore_eos``, so every stream generates ``max_tokens``), after one warm-up request."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {
        "model": model,
        "messages": [{"role": "user", "content": SERVE_PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    async def one(client: httpx.AsyncClient) -> int:
        tokens = 0
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                raise RuntimeError(f"{response.status_code}: {text[:300]}")
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    usage = json.loads(line[6:]).get("usage")
                    if usage:
                        tokens = int(usage["completion_tokens"])
        return tokens

    async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=900) as client:
        try:
            await one(client)  # warm-up: the adapter is loaded onto the device here
            started = time.perf_counter()
            counts = await asyncio.gather(*(one(client) for _ in range(streams)))
            wall = time.perf_counter() - started
        except (RuntimeError, httpx.HTTPError) as exc:
            return {"tok_s": None, "error": f"not served: {exc}"}
    return {"tok_s": sum(counts) / wall, "tokens": sum(counts), "wall_s": wall, "error": None}


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Of one target's measurements, the run with the median tokens/s (the first refusal
    when any run was refused), with every run's figure in ``runs_tok_s``."""
    failed = [r for r in runs if r.get("tok_s") is None]
    if failed:
        return failed[0]
    ordered = sorted(runs, key=lambda r: r["tok_s"])
    return {**ordered[len(ordered) // 2], "runs_tok_s": [r["tok_s"] for r in runs]}


async def measure_in_rounds(
    targets: list[str], measure: Callable[[str, int], Awaitable[dict[str, Any]]]
) -> dict[str, dict[str, Any]]:
    """``measure(target, round)`` for every target, SERVE_ROUNDS times in turns (so that the
    machine's drift moves every target alike); per target, its median run (median_run)."""
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in targets}
    for round_ in range(SERVE_ROUNDS):
        for target in targets:
            runs[target].append(await measure(target, round_))
    return {t: median_run(r) for t, r in runs.items()}


# --------------------------------------------------------------------------- CLI


def register_compare(subparsers: Any) -> None:
    from trainer.cli import field_flags
    from trainer.methods import method_owned_fields
    from trainer.objectives import objective_names

    p = subparsers.add_parser(
        "compare",
        help="train every method on the same data and budget; one table and an HTML report",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--data", required=True, type=Path, help="training data, JSONL")
    p.add_argument("--eval-file", required=True, type=Path, help="eval data, JSONL (same format)")
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated methods (default: {','.join(DEFAULT_METHODS)})",
    )
    p.add_argument("--objective", choices=objective_names(), default="sft")
    p.add_argument("--prefix", default="cmp", help="adapter names are <prefix>-<method>")
    from trainer.sft import SFTJobConfig

    # the shared budget: every common field (the methods' own fields keep their defaults;
    # --method-config sets them per method)
    field_flags(p, SFTJobConfig, skip=method_owned_fields() | NOT_SHARED)
    p.add_argument(
        "--method-config",
        type=Path,
        default=None,
        help='a JSON file {"<method>": {field: value}} of per-method settings '
        '(e.g. {"lora": {"r": 8}, "full": {"extract_rank": 16}})',
    )
    p.add_argument(
        "--report-dir", type=Path, default=None, help="default: <data dir>/compare/<prefix>"
    )
    p.add_argument("--server", default=None, help="register each result and measure serving tok/s")
    p.add_argument("--api-key", default=None, help="bearer token for --server")
    p.set_defaults(func=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    from trainer.cli import default_data_dir, fields_from_args
    from trainer.data import DataError
    from trainer.sft import SFTJobConfig

    try:
        methods = parse_methods(args.methods)
        shared = fields_from_args(args, SFTJobConfig)
        shared["eval_file"] = str(args.eval_file)
        per_method = json.loads(args.method_config.read_text()) if args.method_config else None
        configs = method_configs(args.objective, methods, shared, per_method)
        from trainer.base_model import resolve_base_model
        from trainer.methods import check_against_base

        base_path = resolve_base_model(shared.get("base_model"))
        for m, cfg in configs.items():
            try:
                check_against_base(cfg, base_path)
            except ConfigError as exc:
                raise ConfigError(exc.field, f"method {m}: {str(exc).split(': ', 1)[1]}") from None
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data_dir = default_data_dir()
    report_dir = args.report_dir or data_dir / "compare" / args.prefix
    record = compare_locally(
        args.objective,
        configs,
        args.data,
        prefix=args.prefix,
        data_dir=data_dir,
        report_dir=report_dir,
        server=args.server,
        api_key=args.api_key,
    )
    print(markdown(record["rows"]))
    print(f"report: {report_dir / 'report.html'}")
    return 0 if all(r["state"] == "succeeded" for r in record["rows"]) else 1


def compare_locally(
    objective: str,
    configs: dict[str, JobConfig],
    data: Path,
    *,
    prefix: str,
    data_dir: Path,
    report_dir: Path,
    server: str | None = None,
    api_key: str | None = None,
) -> dict[str, Any]:
    """Run the jobs one by one (each in its own process), register them with ``server``,
    measure serving there, write compare.json / compare.md / report.html."""
    from tqdm import tqdm

    from trainer.cli import register_with_server
    from trainer.data import dataset_hash
    from trainer.jobs import JobManager

    report_dir.mkdir(parents=True, exist_ok=True)
    manager = JobManager(report_dir / "jobs", adapters_dir=data_dir / "trained", max_running=1)
    names = {m: job_name(prefix, m) for m in configs}
    ids = {}
    try:
        for m, cfg in configs.items():
            ids[m] = manager.submit(objective, cfg, data, names[m])
        records: dict[str, dict[str, Any]] = {}
        for m, job_id in ids.items():
            bar = tqdm(desc=f"{objective}/{m}", unit="step", total=None)
            while True:
                rec = manager.get(job_id)
                if rec.get("total_steps"):
                    bar.total = rec["total_steps"]
                bar.n = rec.get("step") or 0
                bar.set_postfix(
                    phase=rec.get("phase") or rec["state"],
                    loss=rec.get("loss"),
                    eval_loss=rec.get("eval_loss"),
                )
                bar.refresh()
                if rec["state"] in ("succeeded", "failed", "cancelled", "interrupted"):
                    rec = manager.wait(job_id)
                    break
                time.sleep(1.0)
            bar.close()
            if rec["state"] == "succeeded" and server:
                code = register_with_server(server, names[m], Path(rec["output_dir"]), api_key)
                rec["registered"] = code == 0
                if code != 0:
                    rec["registration_error"] = "the server refused it (see above)"
            elif rec["state"] != "succeeded":
                print(f"{m}: {rec['state']}: {rec.get('error')}", file=sys.stderr)
            records[m] = rec
    finally:
        manager.close()
    serving: dict[str, Any] = {}
    if server:
        base = _served_base(server, api_key)

        async def measure(target: str, round_: int) -> dict[str, Any]:
            model = base if target == "__base__" else target
            print(
                f"serving {STREAMS} streams on {model} (round {round_ + 1} of {SERVE_ROUNDS}) ...",
                file=sys.stderr,
            )
            return await serving_throughput(server, model, api_key=api_key)

        targets = ["__base__", *(names[m] for m in configs if records[m].get("registered"))]
        serving = asyncio.run(measure_in_rounds(targets, measure))
    else:
        serving = {n: {"tok_s": None, "error": "no --server to measure on"} for n in names.values()}
    first = next(iter(configs.values()))
    record = {
        "id": prefix,
        "object": "train.compare",
        "objective": objective,
        "methods": list(configs),
        "names": names,
        "jobs": ids,
        "budget": {
            k: v
            for k, v in first.to_dict().items()
            if k in ("max_steps", "epochs", "batch_size", "max_length", "seed")
        },
        "data_sha256": dataset_hash(data),
        "serving": serving,
        "created_at": time.time(),
    }
    record["rows"] = rows(list(configs), names, records, serving)
    write_reports(record, report_dir)
    return record


def _served_base(server: str, api_key: str | None) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    models = httpx.get(server.rstrip("/") + "/v1/models", headers=headers, timeout=30).json()
    for card in models.get("data", []):
        if not card.get("parent"):
            return str(card["id"])
    return "base"


def write_reports(record: dict[str, Any], report_dir: Path) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "compare.json").write_text(json.dumps(record, indent=2, default=str))
    (report_dir / "compare.md").write_text(markdown(record["rows"]) + "\n")
    (report_dir / "report.html").write_text(html_report(record))
