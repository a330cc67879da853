"""The soak's report: outcomes, per-minute figures and the verdicts, as CSV and HTML.

Files written to the results folder: soak_outcomes.csv (requests and churn writes by
outcome), soak_churn.csv (every churn write, its status and any error), soak_samples.csv (every sample of the server), soak_minutes.csv (per minute: requests, TTFT, tokens/s, queue depth, resident
memory, adapters loaded/evicted), soak_verdicts.csv (each goal, met or missed, and the
figure behind it), soak_report.html (all of it, with charts), soak_summary.json.
"""

from __future__ import annotations

import csv
import html
import json
from collections import Counter
from pathlib import Path
from typing import Any

from loadtests.soak.ledger import AnswerCheck, Markers

# the short time after a restart during which its refusals still belong to it
RESTART_SLACK_S = 2.0
# RSS goal: after the warm-up, resident memory stays within this of the warm-up's peak
RSS_TOLERANCE = 0.10
WARMUP_MAX_S = 300.0


def _windows(events: dict[str, Any]) -> list[tuple[float, float]]:
    return [(r["killed"], r["ready"] + RESTART_SLACK_S) for r in events.get("restarts", [])]


def _in(t0: float, t1: float, windows: list[tuple[float, float]]) -> bool:
    return any(t0 <= b and t1 >= a for a, b in windows)


def outcome(r: dict[str, Any], windows: list[tuple[float, float]], churned: set[str]) -> str:
    status = r.get("status", 0)
    if 200 <= status < 300:
        return "ok (client hung up)" if r.get("hung_up") else "ok"
    if status == 429:
        return "429 queue full (in the stream)" if r.get("sse_error") else "429 queue full"
    if _in(r["t0"], r["t1"], windows) and (status == 0 or status >= 500):
        return "503/refused during restart"
    if 400 <= status < 500:
        # a split's arms are churned names too
        race = r.get("model") in churned or str(r.get("model")).startswith("ab:")
        return "4xx churn race" if race else "4xx other"
    if status == 503:
        return "503 outside restart"
    return "5xx/broken outside restart"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def build_report(
    *,
    cfg: Any,
    records: list[dict[str, Any]],
    check: AnswerCheck,
    churn: list[dict[str, Any]],
    samples: list[dict[str, Any]],
    events: dict[str, Any],
    final: dict[str, Any],
    expected: dict[str, dict[str, str]],
    markers: Markers | None = None,
) -> dict[str, Any]:
    out: Path = cfg.results
    windows = _windows(events)
    churned = {f"churn-{i}" for i in range(cfg.churn_adapters)}
    t_start = events["t_start"]
    requests = [r for r in records if "status" in r]
    by_outcome = Counter(outcome(r, windows, churned) for r in requests)

    churn_outcomes: Counter[str] = Counter()
    for c in churn:
        s = c["status"]
        if 200 <= s < 300:
            churn_outcomes["ok"] += 1
        elif _in(c["t0"], c["t1"], windows) and s in (0, 502, 503):
            churn_outcomes["refused/unanswered during restart"] += 1
        elif 400 <= s < 500:
            churn_outcomes[f"{s} (churn race)"] += 1
        else:
            churn_outcomes[f"{s} outside restart"] += 1
    forbidden = events.get("forbidden", [])
    forbidden_bad = [
        f for f in forbidden if f["status"] != 403 and not _in(f["t"], f["t"], windows)
    ]

    # per minute
    minutes: dict[int, dict[str, Any]] = {}

    def minute(t: float) -> dict[str, Any]:
        m = max(0, int((t - t_start) // 60))
        return minutes.setdefault(
            m, {"minute": m, "outcomes": Counter(), "ttft": [], "tokens": 0, "samples": []}
        )

    for r in requests:
        row = minute(r["t1"])
        row["outcomes"][outcome(r, windows, churned)] += 1
        if r.get("ttft_ms") is not None:
            row["ttft"].append(r["ttft_ms"])
        row["tokens"] += r.get("tokens") or 0
    for s in samples:
        minute(s["t"])["samples"].append(s)
    # adapter events are counters per server process: sum their increases
    loaded = evicted = 0.0
    prev: dict[str, float] | None = None
    prev_pid = None
    per_min_events: dict[int, list[float]] = {}
    for s in samples:
        if "loaded_total" not in s:
            continue
        if prev is not None and s.get("pid") == prev_pid:
            dl = max(0.0, s["loaded_total"] - prev["loaded_total"])
            de = max(0.0, s["evicted_total"] - prev["evicted_total"])
        else:
            dl, de = s["loaded_total"], s["evicted_total"]
        loaded += dl
        evicted += de
        ev = per_min_events.setdefault(max(0, int((s["t"] - t_start) // 60)), [0.0, 0.0])
        ev[0] += dl
        ev[1] += de
        prev, prev_pid = s, s.get("pid")

    elapsed = max(1.0, events["t_end"] - t_start)
    minute_rows = []
    for m in sorted(minutes):
        row = minutes[m]
        span = min(60.0, elapsed - 60 * m) if elapsed - 60 * m > 0 else 60.0
        rss = [s["rss"] for s in row["samples"] if s.get("rss")]
        queue = [s["queue_depth"] for s in row["samples"] if "queue_depth" in s]
        oc = row["outcomes"]
        minute_rows.append(
            {
                "minute": m,
                "requests": sum(oc.values()),
                "ok": oc["ok"] + oc["ok (client hung up)"],
                "429": oc["429 queue full"] + oc["429 queue full (in the stream)"],
                "restart": oc["503/refused during restart"],
                "4xx": oc["4xx churn race"] + oc["4xx other"],
                "5xx": oc["5xx/broken outside restart"] + oc["503 outside restart"],
                "ttft_p50_ms": _round(percentile(row["ttft"], 0.5)),
                "ttft_p95_ms": _round(percentile(row["ttft"], 0.95)),
                "tokens_per_s": round(row["tokens"] / max(1.0, span), 2),
                "queue_depth_mean": _round(sum(queue) / len(queue)) if queue else None,
                "queue_depth_max": _round(max(queue)) if queue else None,
                "rss_mb_max": _round(max(rss) / 2**20) if rss else None,
                "adapters_loaded": int(per_min_events.get(m, [0, 0])[0]),
                "adapters_evicted": int(per_min_events.get(m, [0, 0])[1]),
            }
        )

    # verdicts
    lost = [x for v in events.get("verifications", []) for x in v["lost"]]
    fivexx = by_outcome["5xx/broken outside restart"] + by_outcome["503 outside restart"]
    fivexx += sum(n for k, n in churn_outcomes.items() if "outside restart" in k)
    warmup = min(WARMUP_MAX_S, 0.4 * cfg.duration_s)
    # a restarting process's loading peak is not a leak: samples in a restart window are out
    steady = [s for s in samples if s.get("rss") and not _in(s["t"], s["t"], windows)]
    rss_early = [s["rss"] for s in steady if s["t"] - t_start <= warmup]
    rss_late = [s["rss"] for s in steady if s["t"] - t_start > warmup]
    rss_peak_early = max(rss_early, default=0)
    rss_peak_late = max(rss_late, default=0)
    restarts = events.get("restarts", [])
    first_ready = events.get("first_ready_s", 0.0)
    ready_limit = 1.5 * first_ready + 5.0
    verdicts = [
        ("0 answers from the wrong adapter", len(check.wrong) == 0,
         f"{len(check.wrong)} wrong of {check.checked} marker-checked answers "
         f"({len(check.wrong_arm)} of them split answers not served by their arm's model); "
         f"{check.matched} equal to their marker, "
         f"{len(check.drifted)} following their own marker past where markers part, then "
         f"leaving it (greedy near-tie), {len(check.ambiguous)} ambiguous, counted neither way "
         f"({_reasons(check.ambiguous)}); "
         f"{check.pairs_seen} (weights, prompt) pairs answered both streamed and not, all equal"),
        ("0 acknowledged writes lost across the kill", not lost,
         f"{len(lost)} lost" + (f": {lost[:3]}" if lost else "")
         + f"; {len(restarts)} kill(s)"),
        ("0 5xx outside the restart window", fivexx == 0,
         f"{fivexx} (requests and churn writes)"),
        (f"resident memory after the first {warmup:.0f} s within {RSS_TOLERANCE:.0%} of its peak",
         bool(rss_late) and rss_peak_late <= (1 + RSS_TOLERANCE) * rss_peak_early,
         f"peak {rss_peak_early / 2**20:.0f} MB in the warm-up, {rss_peak_late / 2**20:.0f} MB after"),
        ("/ready after the kill within the normal start time", all(
            r["ready_s"] <= ready_limit for r in restarts) if restarts else not cfg.crash,
         "; ".join(f"{r['ready_s']:.1f} s" for r in restarts)
         + f" (first start {first_ready:.1f} s; limit 1.5x + 5 s = {ready_limit:.1f} s)"),
        ("the scoped key's admin calls all refused (403)", not forbidden_bad,
         f"{len(forbidden)} tried, {len(forbidden_bad)} not refused"),
        ("structured and tool answers that finished are valid JSON of the schema",
         not check.structured_bad,
         f"{len(check.structured_bad)} invalid of {check.structured_checked}"),
        ("nothing half-written visible after the restart", all(
            not v["staging_left"] for v in events.get("verifications", [])),
         "staging empty at each check; quarantined: "
         + (", ".join(sorted({q for v in events.get('verifications', []) for q in v['quarantined']}))
            or "nothing")),
    ]  # fmt: skip
    sp = final.get("split") or {}
    split_problems = [x for v in events.get("verifications", []) for x in v["lost"]
                      if x.startswith("split")] + sp.get("extra", [])  # fmt: skip
    verdicts.append(
        (
            "A/B split under churn: traffic and feedback counts add up, no arm's wrong adapter",
            not split_problems and check.split_wrong == 0 and check.split_checked > 0,
            f"{check.split_checked} split answers checked, {check.split_wrong} wrong "
            f"({len(check.wrong_arm)} not served by their arm's model); logged per arm "
            f"{sp.get('counts')} against answered {sp.get('answered')} "
            f"(+{sp.get('unanswered', 0)} unanswered); feedback stored {sp.get('feedback')} "
            f"against acknowledged {sp.get('rated')} (+{sp.get('feedback_unanswered', 0)} "
            "unanswered)" + (f"; {split_problems[:3]}" if split_problems else ""),
        )
    )
    if cfg.train:
        states = final.get("jobs", {})
        verdicts.append(
            (
                "training jobs end (succeeded, or interrupted by the kill) with a record",
                bool(states)
                and all(
                    s in ("succeeded", "interrupted", "running", "queued") for s in states.values()
                ),
                ", ".join(f"{j}: {s}" for j, s in states.items()) or "no job recorded",
            )
        )
    # how far apart the markers are: per prompt, the most leading tokens two weight sets'
    # markers share (0: every answer names its weights from its first token)
    parting = max(markers.parting.values(), default=0) if markers else 0
    verdicts[0] = (
        verdicts[0][0],
        verdicts[0][1],
        verdicts[0][2] + f"; two weight sets' markers share at most {parting} leading tokens",
    )
    all_met = all(ok for _, ok, _ in verdicts)

    totals = {
        "duration_s": cfg.duration_s,
        "users": cfg.users,
        "requests": len(requests),
        "churn_writes": len(churn),
        "adapters_loaded": int(loaded),
        "adapters_evicted": int(evicted),
        "elapsed_s": round(elapsed, 1),
    }
    _write_csv(out / "soak_outcomes.csv", ["kind", "outcome", "count"],
               [{"kind": "request", "outcome": k, "count": n} for k, n in sorted(by_outcome.items())]
               + [{"kind": "churn write", "outcome": k, "count": n}
                  for k, n in sorted(churn_outcomes.items())])  # fmt: skip
    if minute_rows:
        _write_csv(out / "soak_minutes.csv", list(minute_rows[0]), minute_rows)
    _write_csv(
        out / "soak_churn.csv",
        ["t0_s", "t1_s", "op", "status", "error"],
        [{"t0_s": round(c["t0"] - t_start, 2), "t1_s": round(c["t1"] - t_start, 2),
          "op": c["op"], "status": c["status"], "error": c.get("error")} for c in churn],
    )  # fmt: skip
    _write_csv(
        out / "soak_verdicts.csv",
        ["goal", "met", "figure"],
        [{"goal": g, "met": ok, "figure": f} for g, ok, f in verdicts],
    )
    _write_csv(
        out / "soak_samples.csv",
        ["t_s", "pid", "rss_mb", "queue_depth", "running", "loaded_total", "evicted_total"],
        [
            {
                "t_s": round(s["t"] - t_start, 1),
                "pid": s.get("pid"),
                "rss_mb": _round(s["rss"] / 2**20) if s.get("rss") else None,
                "queue_depth": s.get("queue_depth"),
                "running": s.get("running"),
                "loaded_total": s.get("loaded_total"),
                "evicted_total": s.get("evicted_total"),
            }
            for s in samples
        ],
    )
    text = _text(totals, by_outcome, churn_outcomes, verdicts, out)
    summary = {
        "totals": totals,
        "outcomes": dict(by_outcome),
        "churn_outcomes": dict(churn_outcomes),
        "verdicts": [{"goal": g, "met": ok, "figure": f} for g, ok, f in verdicts],
        "wrong_answers": check.wrong[:20],
        "marker_checked": check.checked,
        "drifted_answers": len(check.drifted),
        "drifted_examples": check.drifted[:10],
        "ambiguous_answers": len(check.ambiguous),
        "ambiguous_examples": check.ambiguous[:20],
        "wrong_arm_answers": check.wrong_arm[:20],
        "split": sp,
        "split_checked": check.split_checked,
        "markers": expected,
        "calibration": {k: events.get(k) for k in ("candidates_tried", "first_token_clashes")},
        "restarts": restarts,
        "churn_errors": events.get("churn_errors", [])[:20],
        # churn writes that got a 5xx or no answer outside the restart window, and why
        "churn_failures": [
            c
            for c in churn
            if (c["status"] == 0 or c["status"] >= 500) and not _in(c["t0"], c["t1"], windows)
        ][:20],
        "all_met": all_met,
    }
    (out / "soak_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "soak_report.html").write_text(
        _html(totals, by_outcome, churn_outcomes, minute_rows, verdicts, samples, t_start)
    )
    return {**summary, "text": text}


def _reasons(entries: list[dict[str, Any]]) -> str:
    """How many ambiguous answers of each kind (see ledger.Markers.judge)."""
    kinds: Counter[str] = Counter()
    for e in entries:
        reason = e["reason"]
        if "names no weights" in reason:
            kinds["follow no marker past where the markers part"] += 1
        elif reason.startswith("follows its own") and "only" in reason:
            kinds["follow their own marker for a single token"] += 1
        elif reason.startswith("follows the marker of") and "only" in reason:
            kinds["follow another set's marker for a single token (a near-tie)"] += 1
        elif reason.startswith("equals the markers of"):
            kinds["equal several sets' markers"] += 1
        else:
            kinds[reason] += 1
    return "; ".join(f"{n} {k}" for k, n in kinds.most_common()) or "none"


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


def _write_csv(path: Path, fields: list[str], rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def _text(totals, by_outcome, churn_outcomes, verdicts, out: Path) -> str:
    lines = [
        f"soak: {totals['duration_s']} s, {totals['users']} users, {totals['requests']} requests, "
        f"{totals['churn_writes']} churn writes, adapters loaded {totals['adapters_loaded']} / "
        f"evicted {totals['adapters_evicted']} times",
        "requests: " + ", ".join(f"{k} {n}" for k, n in sorted(by_outcome.items())),
        "churn writes: " + ", ".join(f"{k} {n}" for k, n in sorted(churn_outcomes.items())),
    ]
    for goal, ok, figure in verdicts:
        lines.append(f"  [{'met' if ok else 'MISSED'}] {goal}: {figure}")
    lines.append(f"report: {out / 'soak_report.html'} (CSV beside it, locust's in locust_*.csv)")
    return "\n".join(lines)


def _svg(points: list[tuple[float, float]], label: str, unit: str) -> str:
    """A small line chart (no dependencies)."""
    if len(points) < 2:
        return f"<p>{html.escape(label)}: not enough samples</p>"
    w, h, pad = 640, 160, 40
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) or 1
    y1 = max(ys) * 1.1 or 1
    pts = " ".join(
        f"{pad + (x - x0) / max(1e-9, x1 - x0) * (w - 2 * pad):.1f},"
        f"{h - pad / 2 - y / y1 * (h - pad):.1f}"
        for x, y in points
    )
    return (
        f'<figure><svg width="{w}" height="{h}" role="img" aria-label="{html.escape(label)}">'
        f'<polyline fill="none" stroke="#2563eb" stroke-width="2" points="{pts}"/>'
        f'<text x="4" y="12" font-size="11">{y1:.0f} {html.escape(unit)}</text>'
        f'<text x="4" y="{h - 4}" font-size="11">0; x: seconds 0 to {x1 - x0:.0f}</text>'
        f"</svg><figcaption>{html.escape(label)}</figcaption></figure>"
    )


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>none</p>"
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r.values()) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _html(totals, by_outcome, churn_outcomes, minute_rows, verdicts, samples, t_start) -> str:
    rss = [(s["t"] - t_start, s["rss"] / 2**20) for s in samples if s.get("rss")]
    queue = [(s["t"] - t_start, s["queue_depth"]) for s in samples if "queue_depth" in s]
    ttft = [(r["minute"] * 60.0, r["ttft_p50_ms"]) for r in minute_rows if r["ttft_p50_ms"]]
    tps = [(r["minute"] * 60.0, r["tokens_per_s"]) for r in minute_rows]
    verdict_rows = [
        {"goal": g, "met": "met" if ok else "MISSED", "figure": f} for g, ok, f in verdicts
    ]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>swapserve soak</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}</style></head><body>
<h1>swapserve soak</h1>
{_table([totals])}
<h2>Verdicts</h2>{_table(verdict_rows)}
<h2>Requests by outcome</h2>{_table([{"outcome": k, "count": n} for k, n in sorted(by_outcome.items())])}
<h2>Churn writes by outcome</h2>{_table([{"outcome": k, "count": n} for k, n in sorted(churn_outcomes.items())])}
<h2>Per minute</h2>{_table(minute_rows)}
<h2>Charts</h2>
{_svg(rss, "server resident memory (MB), every sample", "MB")}
{_svg(queue, "queue depth, every sample", "waiting")}
{_svg(ttft, "time to first token p50 (ms), per minute", "ms")}
{_svg(tps, "completion tokens/s (all requests), per minute", "tok/s")}
<p>locust's own report: locust.html; raw answers: answers.jsonl.</p>
</body></html>"""
