"""What the churn did and when, and the checks of every answer and every acknowledged write.

An adapter name's history is a list of spans: "name served variant v, possibly, from t_a
to t_b". A write opens the new variant's span when it is sent and closes the old spans when
it is acknowledged, so an answer given while a replace was in flight may come from either
weights, and nothing else. A write whose outcome is unknown (the server died under it)
opens its span without closing the old ones, until the state read after the restart
settles it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

BASE = "base"


@dataclass
class Span:
    variant: str | None  # None: the name is absent (deleted)
    start: float
    end: float | None = None


@dataclass
class AdapterHistory:
    spans: dict[str, list[Span]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def acked(self, name: str, variant: str | None, sent: float, acked: float) -> None:
        """A write acknowledged: `variant` (None: deleted) from `sent` on, the rest ends."""
        with self.lock:
            spans = self.spans.setdefault(name, [])
            for s in spans:
                if s.end is None:
                    s.end = acked
            spans.append(Span(variant, sent))

    def unknown(self, name: str, variant: str | None, sent: float) -> None:
        """A write whose answer never came: the new state may hold from `sent` on."""
        with self.lock:
            # a delete that may have happened counts as much as a register
            self.spans.setdefault(name, []).append(Span(variant, sent))

    def settle(self, name: str, variant: str | None, at: float) -> None:
        """After a restart: what the server says it holds is what it holds."""
        with self.lock:
            spans = self.spans.setdefault(name, [])
            kept = False
            for s in spans:
                if s.end is None:
                    if s.variant == variant and not kept:
                        kept = True
                    else:
                        s.end = at
            if not kept:
                spans.append(Span(variant, at))

    def current(self, name: str) -> set[str | None]:
        """The states the name may be in now (None: absent)."""
        with self.lock:
            open_ = {s.variant for s in self.spans.get(name, []) if s.end is None}
        return open_ or {None}

    def possible(self, name: str, t0: float, t1: float) -> set[str]:
        """The weights the name may have served during [t0, t1]."""
        if name == BASE:
            return {BASE}
        with self.lock:
            return {
                s.variant
                for s in self.spans.get(name, [])
                if s.variant is not None and s.start <= t1 and (s.end is None or s.end >= t0)
            }


@dataclass
class AnswerCheck:
    checked: int = 0
    # an answer that equals, or is closest to, the marker of weights its name never held
    wrong: list[dict[str, Any]] = field(default_factory=list)
    # an answer that equals no marker but is closest to its own weights' (a near-tie in
    # greedy decoding flipped by the batch it ran in: 4-bit kernels on CPU are not
    # batch-invariant); counted apart, never as a wrong adapter
    drifted: list[dict[str, Any]] = field(default_factory=list)
    # an answer that parts from every marker within the characters markers share among
    # themselves (a near-tie at the first token): no weights can be named, none are blamed
    untraceable: list[dict[str, Any]] = field(default_factory=list)
    # (variant, kind, prompt) answered both streamed and non-streamed (both equal its marker)
    pairs_seen: int = 0
    structured_bad: list[dict[str, Any]] = field(default_factory=list)
    structured_checked: int = 0


def check_answers(
    records: list[dict[str, Any]],
    history: AdapterHistory,
    expected: dict[str, dict[str, str]],
) -> AnswerCheck:
    """Every 2xx marker-checked answer equals the marker of a variant its name may have held
    while it ran. `expected[variant]["kind/prompt_i"]` is the calibrated greedy answer."""
    out = AnswerCheck()
    seen: dict[tuple[str, str], set[bool]] = {}
    separation = marker_overlap(expected)
    for r in records:
        kind = r.get("kind")
        if kind in ("structured_check", "tool_check"):
            out.structured_checked += 1
            if not r.get("ok"):
                out.structured_bad.append(r)
            continue
        if kind not in ("chat", "completion", "chat_rag") or r.get("status") != 200:
            continue
        key = f"{kind}/{r['prompt_i']}"
        out.checked += 1
        allowed = history.possible(r["model"], r["t0"], r["t1"])
        text = r.get("text", "")
        matches = [v for v in allowed if expected.get(v, {}).get(key) == text]
        if not matches:
            closest = trace(text, key, expected)
            best = _common_prefix(expected[closest[0]][key], text) if closest else 0
            entry = {**r, "allowed": sorted(allowed), "closest": closest, "shared_chars": best}
            if best <= separation.get(key, 0):
                out.untraceable.append(entry)
            elif allowed & set(closest):
                out.drifted.append(entry)
            else:
                out.wrong.append(entry)
            continue
        if len(matches) == 1:
            seen.setdefault((matches[0], key), set()).add(bool(r.get("stream")))
    out.pairs_seen = sum(1 for modes in seen.values() if modes == {True, False})
    return out


@dataclass
class WriteLedger:
    """Acknowledged writes besides adapters: documents, job records, feedback."""

    docs: dict[str, str] = field(default_factory=dict)  # doc id -> "present"/"absent"/"unknown"
    jobs: set[str] = field(default_factory=set)
    feedback_acked: int = 0
    feedback_unknown: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def present_docs(self) -> list[str]:
        with self.lock:
            return [d for d, s in self.docs.items() if s == "present"]


def verify_state(
    *,
    adapters: dict[str, str],
    history: AdapterHistory,
    names: list[str],
    docs_on_server: set[str],
    ledger: WriteLedger,
    jobs_on_server: set[str],
    feedback_on_server: int,
) -> list[str]:
    """Every acknowledged write is there: the lost ones, as sentences (empty: none lost).
    `adapters` maps each registered name to the variant its source names."""
    lost = []
    for name in names:
        allowed = history.current(name)
        have = adapters.get(name)
        if have not in allowed:
            lost.append(
                f"adapter {name}: server holds {have}, acknowledged {sorted(map(str, allowed))}"
            )
    with ledger.lock:
        for doc, state in ledger.docs.items():
            if state == "present" and doc not in docs_on_server:
                lost.append(f"document {doc}: acknowledged, missing")
            if state == "absent" and doc in docs_on_server:
                lost.append(f"document {doc}: deletion acknowledged, still there")
        for job in ledger.jobs - jobs_on_server:
            lost.append(f"job {job}: acknowledged, no record")
        if feedback_on_server < ledger.feedback_acked:
            lost.append(
                f"feedback: {ledger.feedback_acked} acknowledged, {feedback_on_server} stored"
            )
        if feedback_on_server > ledger.feedback_acked + ledger.feedback_unknown:
            lost.append(f"feedback: {feedback_on_server} stored, more than was ever sent")
    return lost


def marker_overlap(expected: dict[str, dict[str, str]]) -> dict[str, int]:
    """Per prompt, the most leading characters two weight sets' markers share."""
    out: dict[str, int] = {}
    answers = list(expected.values())
    for i, a in enumerate(answers):
        for b in answers[i + 1 :]:
            for key in a.keys() & b.keys():
                out[key] = max(out.get(key, 0), _common_prefix(a[key], b[key]))
    return out


def trace(text: str, key: str, expected: dict[str, dict[str, str]]) -> list[str]:
    """The weights that wrote `text`: those whose marker for `key` it equals, else those
    whose marker shares the longest prefix with it (markers part at the first tokens)."""
    exact = sorted(v for v, answers in expected.items() if answers.get(key) == text)
    if exact:
        return exact
    shared = {v: _common_prefix(a[key], text) for v, a in expected.items() if key in a}
    best = max(shared.values(), default=0)
    return sorted(v for v, n in shared.items() if n == best)


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
