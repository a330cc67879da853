"""What the churn did and when, and the checks of every answer and every acknowledged write.

An adapter name's history is a list of spans: "name served variant v, possibly, from t_a
to t_b". A write opens the new variant's span when it is sent and closes the old spans when
it is acknowledged, so an answer given while a replace was in flight may come from either
weights, and nothing else. A write whose outcome is unknown (the server died under it)
opens its span without closing the old ones, until the state read after the restart
settles it.

Which weights wrote an answer is judged in tokens (`Markers.judge`): an answer names
weights only by following their calibrated greedy answer (marker) for at least
MIN_EVIDENCE_TOKENS tokens past the point where the markers part from each other, so a
single greedy near-tie never makes a wrong-adapter verdict; what names no weights, or too
few tokens' worth, is reported as ambiguous with its evidence, counted neither way.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
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


Tokenize = Callable[[str], list[str]]

# An answer names the weights that wrote it only by following their marker past the point
# where the markers part from each other, for at least this many tokens. One token is not
# enough: a greedy near-tie (the batch a row runs in moves its logits in the last bits on
# NF4 CPU kernels) can flip a token to its runner-up, and a runner-up can be exactly what
# another weight set would have written there.
MIN_EVIDENCE_TOKENS = 2


@dataclass
class Judgement:
    verdict: str  # "match", "drifted", "ambiguous" or "wrong"
    weights: list[str]  # the weights the evidence names (empty when it names none)
    reason: str
    evidence: dict[str, Any]


class Markers:
    """The calibrated greedy answers, `expected[weights]["kind/prompt_i"]`, in tokens, and
    per prompt the most leading tokens two weight sets' markers share (`parting`)."""

    def __init__(self, expected: dict[str, dict[str, str]], tokenize: Tokenize):
        self.expected = expected
        self.tokenize = tokenize
        self.tokens = {w: {k: tokenize(t) for k, t in m.items()} for w, m in expected.items()}
        self.parting: dict[str, int] = {}
        names = sorted(self.tokens)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                for key in self.tokens[a].keys() & self.tokens[b].keys():
                    n = _common_prefix(self.tokens[a][key], self.tokens[b][key])
                    self.parting[key] = max(self.parting.get(key, 0), n)

    def judge(
        self, text: str, key: str, allowed: set[str], min_evidence: int = MIN_EVIDENCE_TOKENS
    ) -> Judgement:
        """Which weights wrote `text` (the answer to prompt `key` on a name that may have
        held `allowed` while it ran), and whether the evidence is enough to say so.

        match: equal to an allowed marker and to no other's. drifted: follows an allowed
        marker for `min_evidence` tokens or more past where the markers part, then leaves
        it (a greedy near-tie later on). wrong: equal to, or following for `min_evidence`
        tokens or more past the parting, the marker of weights the name never held while
        the request ran, and no allowed marker. ambiguous: anything else: the answer names
        no weights, or names them on too little evidence, or equals several markers; the
        evidence says which, and it counts neither as right nor as wrong."""
        toks = self.tokenize(text)
        parting = self.parting.get(key, 0)
        shared = {w: _common_prefix(toks, m[key]) for w, m in self.tokens.items() if key in m}
        exact = sorted(w for w, m in self.expected.items() if m.get(key) == text)
        evidence: dict[str, Any] = {
            "tokens": toks,
            "parting_tokens": parting,
            "shared_tokens": {w: n for w, n in sorted(shared.items()) if n},
            "exact": exact,
            "allowed": sorted(allowed),
        }
        own_exact = [w for w in exact if w in allowed]
        foreign_exact = [w for w in exact if w not in allowed]
        if own_exact and not foreign_exact:
            return Judgement("match", own_exact, "equals its own weights' marker", evidence)
        if own_exact:
            return Judgement(
                "ambiguous",
                exact,
                f"equals the markers of {exact}, some allowed and some not",
                evidence,
            )
        # how far past the parting point the answer follows each marker (or all of it)
        past = {w: n - parting for w, n in shared.items() if n > parting}
        for w in foreign_exact:
            past[w] = max(past.get(w, 0), len(self.tokens[w][key]) - parting)
        own = sorted(w for w in past if w in allowed)
        foreign = sorted(w for w in past if w not in allowed)
        if own and not foreign:
            w = own[0]
            if past[w] >= min_evidence:
                return Judgement(
                    "drifted",
                    own,
                    f"follows its own weights' marker ({w}) for {shared[w]} tokens, then leaves it",
                    evidence,
                )
            return Judgement(
                "ambiguous",
                own,
                f"follows its own weights' marker ({w}) for only {past[w]} token(s) past where "
                "the markers part: too little to name the weights",
                evidence,
            )
        if foreign and not own:
            strong = [w for w in foreign if past[w] >= min_evidence]
            if strong:
                how = "equals" if set(strong) <= set(foreign_exact) else "follows"
                return Judgement(
                    "wrong",
                    strong,
                    f"{how} the marker of {strong} ({max(past[w] for w in strong)} tokens past "
                    "where the markers part), weights this name did not hold while it ran",
                    evidence,
                )
            return Judgement(
                "ambiguous",
                foreign,
                f"follows the marker of {foreign} for only {max(past.values())} token(s) past "
                "where the markers part: a near-tie of its own weights could write that too",
                evidence,
            )
        if own and foreign:
            return Judgement(
                "ambiguous", own + foreign, "follows markers of allowed and other weights", evidence
            )
        return Judgement(
            "ambiguous",
            [],
            "leaves every marker before the markers part from each other: names no weights",
            evidence,
        )


@dataclass
class AnswerCheck:
    checked: int = 0
    # answers the evidence traces to weights the name never held while they ran
    wrong: list[dict[str, Any]] = field(default_factory=list)
    # answers that follow their own weights' marker well past where markers part, then
    # leave it (a greedy near-tie flipped by the batch they ran in: 4-bit kernels on CPU
    # are not batch-invariant); counted apart, never as a wrong adapter
    drifted: list[dict[str, Any]] = field(default_factory=list)
    # answers whose evidence names no weights, or too few tokens' worth: reported with
    # the evidence, counted neither as right nor as wrong
    ambiguous: list[dict[str, Any]] = field(default_factory=list)
    # split answers served by a model that is not their arm's
    wrong_arm: list[dict[str, Any]] = field(default_factory=list)
    split_checked: int = 0  # of `checked`, answers through the A/B split
    split_wrong: int = 0  # of `wrong`, answers through the A/B split
    # (variant, kind, prompt) answered both streamed and non-streamed (both equal its marker)
    pairs_seen: int = 0
    structured_bad: list[dict[str, Any]] = field(default_factory=list)
    structured_checked: int = 0

    @property
    def matched(self) -> int:
        return self.checked - len(self.wrong) - len(self.drifted) - len(self.ambiguous)


def check_answers(
    records: list[dict[str, Any]],
    history: AdapterHistory,
    markers: Markers,
    split_arms: dict[str, str] | None = None,
) -> AnswerCheck:
    """Every 2xx marker-checked answer is judged against the markers of the weights its
    name may have held while it ran (`Markers.judge`). A split answer (`ab:<split>`) is
    checked against its arm's model (`split_arms`: arm -> model): the arm the server says
    served it must be one of the split's, with that arm's model."""
    out = AnswerCheck()
    seen: dict[tuple[str, str], set[bool]] = {}
    split_arms = split_arms or {}
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
        name = r["model"]
        if name.startswith("ab:"):
            out.split_checked += 1
            arm_model = split_arms.get(r.get("arm") or "")
            if arm_model is None or r.get("served_by") != arm_model:
                out.wrong_arm.append({**r, "arms": split_arms})
                out.wrong.append({**r, "reason": "not served by its arm's model"})
                out.split_wrong += 1
                continue
            name = arm_model
        allowed = history.possible(name, r["t0"], r["t1"])
        j = markers.judge(r.get("text", ""), key, allowed)
        entry = {**r, "reason": j.reason, "weights": j.weights, "evidence": j.evidence}
        if j.verdict == "wrong":
            out.wrong.append(entry)
            out.split_wrong += r["model"].startswith("ab:")
        elif j.verdict == "drifted":
            out.drifted.append(entry)
        elif j.verdict == "ambiguous":
            out.ambiguous.append(entry)
        else:
            seen.setdefault((j.weights[0], key), set()).add(bool(r.get("stream")))
    out.pairs_seen = sum(1 for modes in seen.values() if modes == {True, False})
    return out


@dataclass
class WriteLedger:
    """Acknowledged writes besides adapters: documents and job records (the split's logged
    answers and feedback come from the clients' records: `check_split`)."""

    docs: dict[str, str] = field(default_factory=dict)  # doc id -> "present"/"absent"/"unknown"
    jobs: set[str] = field(default_factory=set)
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
    return lost


UNANSWERED = (0, 598, 599)  # no answer came (the server died, the stream broke): the
# server may or may not have logged it; so may any 5xx but a 503 (a refusal before any work)


def _unanswered(status: int) -> bool:
    return status in UNANSWERED or (status >= 500 and status != 503)


def check_split(
    records: list[dict[str, Any]], split: dict[str, Any], *, model: str, final: bool
) -> tuple[list[str], list[str], dict[str, Any]]:
    """The A/B split's traffic and feedback counts against what its clients were told:
    (lost, extra, figures). `split` is `GET /ab/splits/<name>`, read after `records`.

    lost: per arm, fewer answers logged (`counts`) than clients got from that arm, or
    fewer feedback entries stored than were acknowledged: acknowledged writes gone.
    extra (only when `final`, every client done): more logged than clients got, beyond
    the requests that never got an answer (the server logs an answer just before it
    sends its end; a kill in between leaves one logged and unanswered)."""
    arms = [a["name"] for a in split["arms"]]
    counts, feedback = split.get("counts", {}), split.get("feedback", {})
    served = dict.fromkeys(arms, 0)
    rated = dict.fromkeys(arms, 0)
    unanswered = fb_unanswered = 0
    for r in records:
        if r.get("model") != model or "status" not in r:
            continue
        status = r["status"]
        answered = 200 <= status < 300
        if r.get("kind") == "feedback":
            if answered:
                rated[r.get("arm")] = rated.get(r.get("arm"), 0) + 1
            elif _unanswered(status):
                fb_unanswered += 1
        elif answered:
            served[r.get("arm")] = served.get(r.get("arm"), 0) + 1
        elif _unanswered(status):
            unanswered += 1
    lost, extra = [], []
    if sorted(counts) != sorted(arms) or sorted(feedback) != sorted(arms):
        lost.append(f"split: arms {arms}, counts for {sorted(counts)}, feedback {sorted(feedback)}")
    for arm in served.keys() | rated.keys():
        if served.get(arm, 0) > counts.get(arm, 0):
            lost.append(
                f"split arm {arm}: {served[arm]} answers given, {counts.get(arm, 0)} logged"
            )
        if rated.get(arm, 0) > feedback.get(arm, 0):
            lost.append(
                f"split arm {arm}: {rated[arm]} ratings acknowledged, {feedback.get(arm, 0)} stored"
            )
    if final:
        over = sum(counts.values()) - sum(served.values())
        if over > unanswered:
            extra.append(
                f"split: {over} answers logged beyond those given, {unanswered} unanswered"
            )
        fb_over = sum(feedback.values()) - sum(rated.values())
        if fb_over > fb_unanswered:
            extra.append(
                f"split: {fb_over} ratings stored beyond those acknowledged, "
                f"{fb_unanswered} unanswered"
            )
    figures = {"counts": counts, "feedback": feedback, "answered": served, "rated": rated,
               "unanswered": unanswered, "feedback_unanswered": fb_unanswered}  # fmt: skip
    return lost, extra, figures


def _common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
