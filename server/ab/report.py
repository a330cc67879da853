"""A finished experiment as one self-contained HTML page: inline SVG charts, no scripts,
no external assets (it is mailed around and opened offline)."""

from __future__ import annotations

from html import escape
from typing import Any

from server.ab.metrics import METRICS

LABELS = {"exact_match": "Exact match", "token_f1": "Token F1", "rouge_l": "ROUGE-L"}
COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f"]


def _legend(names: list[str], x: float, y: float) -> str:
    out = []
    for i, n in enumerate(names):
        yy = y + i * 18
        out.append(f'<rect x="{x}" y="{yy}" width="12" height="12" fill="{COLORS[i % 8]}"/>')
        out.append(f'<text x="{x + 18}" y="{yy + 10}" font-size="12">{escape(n)}</text>')
    return "".join(out)


def _bar_chart(
    groups: list[str],
    names: list[str],
    values: dict[str, list[tuple[float, float | None, float | None]]],
    *,
    y_max: float,
    unit: str,
    title: str,
) -> str:
    """Grouped vertical bars, one group per entry of `groups`, one bar per arm, with
    optional whiskers (low, high)."""
    width, height, left, top, bottom, legend_w = 720, 280, 50, 30, 40, 150
    plot_w, plot_h = width - left - legend_w, height - top - bottom
    y_max = y_max or 1.0
    group_w = plot_w / len(groups)
    bar_w = min(40.0, group_w * 0.8 / len(names))
    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="{escape(title)}" font-family="sans-serif">',
        f'<text x="{left}" y="18" font-size="14" font-weight="bold">{escape(title)}</text>',
    ]
    for k in range(5):  # grid lines and y labels
        v = y_max * k / 4
        y = top + plot_h - plot_h * k / 4
        svg.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
        )
        svg.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">'
            f"{v:.2f}{unit}</text>"
        )
    for g, group in enumerate(groups):
        gx = left + g * group_w + (group_w - bar_w * len(names)) / 2
        for i, name in enumerate(names):
            value, low, high = values[name][g]
            h = plot_h * min(value, y_max) / y_max
            x = gx + i * bar_w
            svg.append(
                f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{bar_w - 2:.1f}" '
                f'height="{h:.1f}" fill="{COLORS[i % 8]}"><title>{escape(name)}: '
                f"{value:.3f}{unit}</title></rect>"
            )
            if low is not None and high is not None:
                cx = x + (bar_w - 2) / 2
                y_lo = top + plot_h - plot_h * min(low, y_max) / y_max
                y_hi = top + plot_h - plot_h * min(high, y_max) / y_max
                svg.append(
                    f'<path d="M{cx:.1f} {y_lo:.1f}V{y_hi:.1f}M{cx - 4:.1f} {y_lo:.1f}'
                    f'h8M{cx - 4:.1f} {y_hi:.1f}h8" stroke="#222" stroke-width="1.5"/>'
                )
        svg.append(
            f'<text x="{left + g * group_w + group_w / 2:.1f}" y="{height - bottom + 18}" '
            f'font-size="12" text-anchor="middle">{escape(group)}</text>'
        )
    svg.append(
        f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="#333"/>'
    )
    svg.append(_legend(names, width - legend_w + 20, top))
    svg.append("</svg>")
    return "".join(svg)


def _ci(d: dict[str, float], key: str = "mean") -> str:
    return (
        f"{d[key]:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
        if key == "diff"
        else (f"{d[key]:.3f} [{d['low']:.3f}, {d['high']:.3f}]")
    )


def _rate(value: float | None) -> str:
    return "&ndash;" if value is None else f"{value:.2f}"


def render_report(rec: dict[str, Any]) -> str:
    names = [a["name"] for a in rec["arms"]]
    summary = rec.get("summary")
    title = rec.get("name") or rec["id"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>A/B report: {escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:24px;color:#222;max-width:1100px}"
        "table{border-collapse:collapse;margin:12px 0;font-size:13px}"
        "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
        "th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}"
        ".err{color:#b00}.muted{color:#777}</style></head><body>",
        f"<h1>A/B report: {escape(title)}</h1>",
        f"<p>Experiment <code>{escape(rec['id'])}</code>: status <b>{escape(rec['status'])}</b>, "
        f"{rec['progress']['done']}/{rec['progress']['total']} questions, {len(names)} arms.</p>",
    ]
    budget = rec.get("budget") or {}
    auto = set(budget.get("arms") or [])

    def max_tokens(a: dict[str, Any]) -> str:
        if a["name"] in auto:
            return f"{a.get('max_tokens')} <span class='muted'>(from the references)</span>"
        return str(a.get("max_tokens") or "server default")

    arm_rows = "".join(
        f"<tr><td>{escape(a['name'])}</td><td>{escape(a['model'])}</td>"
        f"<td>{escape(str((a.get('rag') or {}).get('collection', '')))}</td>"
        f"<td class='n'>{max_tokens(a)}</td></tr>"
        for a in rec["arms"]
    )
    parts.append(
        "<table><tr><th>Arm</th><th>Model</th><th>RAG collection</th><th>max_tokens</th></tr>"
        f"{arm_rows}</table>"
    )
    if auto:
        parts.append(
            f"<p class='muted'>Arms that set no max_tokens answer with at most "
            f"{budget['max_tokens']} tokens: the longest reference is "
            f"{budget['longest_reference_tokens']} tokens, plus {budget['margin']} (at most "
            f"{budget['cap']}); a longer answer could not match a reference exactly.</p>"
        )
    if summary:
        arms = summary["arms"]
        scores = {
            n: [
                (
                    arms[n]["scores"][m]["mean"],
                    arms[n]["scores"][m]["low"],
                    arms[n]["scores"][m]["high"],
                )
                for m in METRICS
            ]
            for n in names
        }
        parts.append(
            _bar_chart(
                [LABELS[m] for m in METRICS],
                names,
                scores,
                y_max=1.0,
                unit="",
                title="Scores (mean, 95% bootstrap CI)",
            )
        )
        lat_keys = [
            ("ttft_s", "mean", "TTFT mean"),
            ("latency_s", "p50", "Latency p50"),
            ("latency_s", "p95", "Latency p95"),
        ]
        lat = {n: [(arms[n][k][s], None, None) for k, s, _ in lat_keys] for n in names}
        top = max([v for n in names for v, _, _ in lat[n]] + [0.001]) * 1.1
        parts.append(
            _bar_chart(
                [t for _, _, t in lat_keys],
                names,
                lat,
                y_max=top,
                unit="s",
                title="Latency (seconds)",
            )
        )
        head = "".join(f"<th>{LABELS[m]}</th>" for m in METRICS)
        rows = "".join(
            f"<tr><td>{escape(n)}</td>"
            + "".join(f"<td class='n'>{_ci(arms[n]['scores'][m])}</td>" for m in METRICS)
            + f"<td class='n'>{arms[n]['ttft_s']['mean']:.3f}</td>"
            f"<td class='n'>{arms[n]['latency_s']['mean']:.3f} / {arms[n]['latency_s']['p50']:.3f}"
            f" / {arms[n]['latency_s']['p95']:.3f}</td>"
            f"<td class='n'>{arms[n]['prompt_tokens']} / {arms[n]['completion_tokens']}</td>"
            f"<td class='n'>{_rate(arms[n].get('retrieval_hit_rate'))}</td>"
            f"<td class='n'>{arms[n]['errors']}</td></tr>"
            for n in names
        )
        parts.append(
            "<h2>Arms</h2><table><tr><th>Arm</th>" + head + "<th>TTFT mean (s)</th>"
            "<th>Latency mean / p50 / p95 (s)</th><th>Tokens prompt / completion</th>"
            "<th title='share of questions with a doc_id whose document was retrieved'>"
            f"Retrieval hit</th><th>Errors</th></tr>{rows}</table>"
        )
        if summary["comparisons"]:
            rows = "".join(
                f"<tr><td>{escape(c['arm'])} &minus; {escape(c['baseline'])}</td>"
                + "".join(f"<td class='n'>{_ci(c[m], 'diff')}</td>" for m in METRICS)
                + "</tr>"
                for c in summary["comparisons"]
            )
            parts.append(
                "<h2>Differences vs the first arm</h2><p class='muted'>Mean difference with a "
                "95% paired bootstrap interval (1000 resamples); an interval that excludes 0 "
                "is a difference this question set can see.</p>"
                f"<table><tr><th>Comparison</th>{head}</tr>{rows}</table>"
            )
    else:
        parts.append("<p class='muted'>No summary yet: the experiment has not completed.</p>")
    parts.append(
        "<h2>Per question</h2><table><tr><th>Question</th><th>References</th>"
        + "".join(f"<th>{escape(n)}</th>" for n in names)
        + "</tr>"
    )
    for q, answers in zip(rec["questions"], rec["results"], strict=True):
        cells = []
        for a in answers or [None] * len(names):
            if a is None:
                cells.append("<td class='muted'>pending</td>")
                continue
            s = a["scores"]
            docs = ", ".join(a["doc_ids"]) or "&ndash;"
            err = f"<div class='err'>{escape(a['error'])}</div>" if a["error"] else ""
            cells.append(
                f"<td>{escape(a['answer'])}{err}<div class='muted'>EM {s['exact_match']:.0f} · "
                f"F1 {s['token_f1']:.2f} · RL {s['rouge_l']:.2f} · {a['latency_s']:.2f}s · "
                f"docs: {escape(docs) if a['doc_ids'] else docs}</div></td>"
            )
        refs = "<br>".join(escape(r) for r in q["references"])
        parts.append(
            f"<tr><td><b>{escape(q['id'])}</b> {escape(q['question'])}</td><td>{refs}</td>"
            + "".join(cells)
            + "</tr>"
        )
    parts.append("</table></body></html>")
    return "".join(parts)
