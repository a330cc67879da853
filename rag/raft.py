"""RAFT-style SFT data from a collection and a question set (Zhang et al., 2024).

Each question becomes one chat example: the user turn holds the question with retrieved
passages, exactly as the server builds it at request time (``rag.prompt.augment_messages``,
the default ``mode="user"``), and the assistant turn is the reference answer. The passages
are the *oracle* chunk (the one that holds the answer) and ``distractors`` other chunks,
shuffled. A fraction ``p_no_oracle`` of the examples gets distractors only (one more, so
every example shows as many passages), still with the right answer: the model learns to
read the passages when they help and to rely on what it has learnt when they do not,
which is what keeps an adapter from getting worse once retrieval is added.

How the oracle is found, per question:
  1. the question line names ``doc_id``: the chunk of that document that contains a
     reference answer (several: the one retrieval ranks highest for the question; none:
     the best-ranked chunk of the document);
  2. otherwise: the best-ranked of the top ``candidates`` retrieved chunks that contains a
     reference answer, else any chunk of the collection that contains one.
"Contains" means the reference's normalised tokens (lower case, no punctuation, no
articles) appear as a contiguous run in the chunk's. A question with no such chunk and no
``doc_id`` is an error: its answer is not in the collection.

Distractors are, by default, the chunks retrieval ranks highest for the question that are
neither in the oracle's document nor contain the answer (the hard negatives a model meets
at serving time); ``distractor_source="random"`` draws them uniformly instead. Everything
random (shuffles, which examples lose the oracle) comes from one ``seed``.

The question set is the A/B experiments' format, one JSON object a line:
``{"id"?, "question", "references": [...], "doc_id"?}``.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rag.collection import Collection, Hit
from rag.errors import InvalidArgument
from rag.prompt import augment_messages

QUESTION_FIELDS = {"id", "question", "references", "doc_id"}
Progress = Callable[[int, int], None]


class RaftDataError(InvalidArgument):
    """Bad question set: every problem found, one per line of the message."""

    def __init__(self, problems: Sequence[str], *, source: str = "questions") -> None:
        self.problems = list(problems)
        shown = self.problems[:20]
        more = len(self.problems) - len(shown)
        lines = "\n  ".join(shown) + (f"\n  ... and {more} more" if more > 0 else "")
        super().__init__(f"{source}: {len(self.problems)} problem(s):\n  {lines}", param=source)


@dataclass
class RaftConfig:
    distractors: int = 3
    """Distractor chunks beside the oracle (k). With the oracle that makes k+1 passages,
    the server's default rag.top_k (4) for k = 3."""
    p_no_oracle: float = 0.2
    """Fraction of examples that get k+1 distractors and no oracle (RAFT's P is 1 - this)."""
    distractor_source: Literal["retrieved", "random"] = "retrieved"
    """'retrieved': the top-ranked non-oracle chunks (hard negatives); 'random': uniform."""
    candidates: int = 20
    """Chunks retrieved per question to pick the oracle and distractors from (1-100)."""
    closed_book: float = 0.0
    """Fraction of questions that also get an example with no passages at all: the bare
    question, as an arm without retrieval asks it."""
    cite: bool = False
    """Append the oracle's passage number to the answer (`Saltmere [2]`), as the serving
    instructions ask; off by default because it costs exact match in A/B scores."""
    seed: int = 0
    instructions: str | None = None
    """The instructions above the passages; None = the server's (rag.prompt)."""

    def validate(self) -> None:
        if not isinstance(self.distractors, int) or not 0 <= self.distractors <= 50:
            raise InvalidArgument("distractors must be an integer in [0, 50]", param="distractors")
        for name in ("p_no_oracle", "closed_book"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise InvalidArgument(f"{name} must be a number in [0, 1]", param=name)
        if self.distractor_source not in ("retrieved", "random"):
            raise InvalidArgument(
                "distractor_source must be 'retrieved' or 'random'", param="distractor_source"
            )
        if not isinstance(self.candidates, int) or not 1 <= self.candidates <= 100:
            raise InvalidArgument("candidates must be an integer in [1, 100]", param="candidates")


@dataclass
class RaftQuestion:
    id: str
    question: str
    references: list[str]
    doc_id: str | None = None
    line: int = 0


@dataclass
class RaftStats:
    questions: int = 0
    examples: int = 0
    with_oracle: int = 0
    without_oracle: int = 0
    closed_book: int = 0
    oracle_by_doc_id: int = 0
    oracle_by_answer: int = 0
    oracle_in_top_k: int = 0
    """Questions whose oracle retrieval alone ranks within the first k+1: how often
    serving-time retrieval would have shown it."""
    short_of_distractors: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# --- the question set ---------------------------------------------------------------------


def parse_questions(lines: Iterable[str], *, source: str = "questions") -> list[RaftQuestion]:
    """Validate every line; raise RaftDataError listing every problem (with line numbers)."""
    problems: list[str] = []
    out: list[RaftQuestion] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"line {n}: malformed JSON: {exc.msg} at column {exc.colno}")
            continue
        if not isinstance(obj, dict):
            problems.append(f"line {n}: expected a JSON object, got {type(obj).__name__}")
            continue
        before = len(problems)
        unknown = sorted(set(obj) - QUESTION_FIELDS)
        if unknown:
            problems.append(
                f"line {n}: unknown field(s) {', '.join(unknown)}; expected "
                "id?, question, references, doc_id?"
            )
        q = obj.get("question")
        if not isinstance(q, str) or not q.strip():
            problems.append(f"line {n}: `question` is missing or empty")
        refs = obj.get("references")
        if refs is None:
            problems.append(f"line {n}: `references` is missing (a list of acceptable answers)")
        elif (
            not isinstance(refs, list)
            or not refs
            or not all(isinstance(r, str) and r.strip() for r in refs)
        ):
            problems.append(f"line {n}: `references` must be a non-empty list of non-empty strings")
        qid = obj.get("id", f"q{len(out) + 1}")
        if not isinstance(qid, str) or not qid:
            problems.append(f"line {n}: `id` must be a non-empty string")
        elif qid in seen:
            problems.append(f"line {n}: id {qid!r} repeats line {seen[qid]}")
        doc_id = obj.get("doc_id")
        if doc_id is not None and (not isinstance(doc_id, str) or not doc_id):
            problems.append(f"line {n}: `doc_id` must be a non-empty string")
        if len(problems) > before:
            continue
        assert isinstance(q, str) and isinstance(refs, list)  # checked above; for mypy
        seen[qid] = n
        out.append(RaftQuestion(qid, q.strip(), [r.strip() for r in refs], doc_id, n))
    if not out and not problems:
        problems.append("the question set is empty: no JSON lines found")
    if problems:
        raise RaftDataError(problems, source=source)
    return out


def read_questions(path: str | Path) -> list[RaftQuestion]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise RaftDataError([f"no such file: {path}"], source=str(path)) from exc
    except UnicodeDecodeError as exc:
        raise RaftDataError([f"not UTF-8 text: {exc}"], source=str(path)) from exc
    return parse_questions(text.splitlines(), source=str(path))


# --- finding the oracle -------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_tokens(text: str) -> list[str]:
    """SQuAD-style: lower case, punctuation deleted ("2,300" -> "2300"), no articles."""
    return _ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split()


def _contains(haystack: Sequence[str], needle: Sequence[str]) -> bool:
    n = len(needle)
    return n > 0 and any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


def supports(chunk_text: str, references: Sequence[str]) -> bool:
    """Whether the chunk contains one of the reference answers (normalised tokens, in order)."""
    tokens = normalize_tokens(chunk_text)
    return any(_contains(tokens, normalize_tokens(r)) for r in references)


def _chunk_key(h: Hit) -> tuple[str, int]:
    return (h.doc_id, h.chunk_index)


# --- the builder --------------------------------------------------------------------------


def build_raft(
    collection: Collection,
    questions: Sequence[RaftQuestion],
    config: RaftConfig | None = None,
    *,
    progress: Progress | None = None,
) -> tuple[list[dict[str, Any]], RaftStats]:
    """SFT records (``{"messages": [...], "raft": {...}}``) and what went into them.

    Every question is checked before any record is returned: a ``doc_id`` the collection
    does not hold, or an answer found in no chunk, raises RaftDataError naming them all.
    """
    cfg = config or RaftConfig()
    cfg.validate()
    if not questions:
        raise RaftDataError(["the question set is empty"])
    all_chunks = collection.chunks()
    if not all_chunks:
        raise InvalidArgument(
            f"collection {collection.name!r} holds no chunks: ingest documents first",
            param="collection",
        )
    by_doc: dict[str, list[Hit]] = {}
    for h in all_chunks:
        by_doc.setdefault(h.doc_id, []).append(h)
    rng = random.Random(cfg.seed)
    stats = RaftStats(questions=len(questions))
    n_passages = cfg.distractors + 1
    problems: list[str] = []
    plans: list[tuple[RaftQuestion, Hit, list[Hit]]] = []
    for done, q in enumerate(questions, start=1):
        ranked = collection.search(q.question, top_k=min(cfg.candidates, len(all_chunks)))
        oracle, why = _oracle(q, ranked, by_doc, all_chunks)
        if oracle is None:
            problems.append(f"line {q.line} ({q.id}): {why}")
        else:
            if why == "doc_id":
                stats.oracle_by_doc_id += 1
            else:
                stats.oracle_by_answer += 1
            if _chunk_key(oracle) in {_chunk_key(h) for h in ranked[:n_passages]}:
                stats.oracle_in_top_k += 1
            plans.append((q, oracle, ranked))
        if progress is not None:
            progress(done, len(questions))
    if problems:
        raise RaftDataError(problems)

    no_oracle = set(rng.sample(range(len(plans)), round(cfg.p_no_oracle * len(plans))))
    closed = set(rng.sample(range(len(plans)), round(cfg.closed_book * len(plans))))
    records: list[dict[str, Any]] = []
    for i, (q, oracle, ranked) in enumerate(plans):
        with_oracle = i not in no_oracle
        want = cfg.distractors if with_oracle else n_passages
        distractors = _distractors(q, oracle, ranked, all_chunks, want, cfg, rng)
        if len(distractors) < want:
            stats.short_of_distractors += 1
            stats.warnings.append(
                f"{q.id}: only {len(distractors)} of {want} distractors (the collection has "
                "too few chunks outside the oracle's document without the answer)"
            )
        passages = [*distractors, oracle] if with_oracle else list(distractors)
        rng.shuffle(passages)
        answer = q.references[0]
        if with_oracle and cfg.cite:
            answer = f"{answer} [{passages.index(oracle) + 1}]"
        user = augment_messages(
            [{"role": "user", "content": q.question}], passages, instructions=cfg.instructions
        )
        records.append(
            {
                "messages": [*user, {"role": "assistant", "content": answer}],
                "raft": {
                    "question_id": q.id,
                    "kind": "oracle" if with_oracle else "no_oracle",
                    "oracle": {"doc_id": oracle.doc_id, "chunk_index": oracle.chunk_index},
                    "passages": [
                        {"doc_id": h.doc_id, "chunk_index": h.chunk_index} for h in passages
                    ],
                },
            }
        )
        if with_oracle:
            stats.with_oracle += 1
        else:
            stats.without_oracle += 1
        if i in closed:
            records.append(
                {
                    "messages": [
                        {"role": "user", "content": q.question},
                        {"role": "assistant", "content": q.references[0]},
                    ],
                    "raft": {"question_id": q.id, "kind": "closed_book", "passages": []},
                }
            )
            stats.closed_book += 1
    stats.examples = len(records)
    return records, stats


def _oracle(
    q: RaftQuestion, ranked: Sequence[Hit], by_doc: dict[str, list[Hit]], all_chunks: list[Hit]
) -> tuple[Hit | None, str]:
    rank = {_chunk_key(h): i for i, h in enumerate(ranked)}

    def best(chunks: Sequence[Hit]) -> Hit:
        # retrieval's order first; chunks it did not return keep document order, after it
        return min(chunks, key=lambda h: (rank.get(_chunk_key(h), len(rank)), _chunk_key(h)))

    if q.doc_id is not None:
        chunks = by_doc.get(q.doc_id)
        if not chunks:
            return None, f"doc_id {q.doc_id!r} is not in the collection"
        holding = [h for h in chunks if supports(h.text, q.references)]
        return best(holding or chunks), "doc_id"
    for h in ranked:
        if supports(h.text, q.references):
            return h, "answer"
    holding = [h for h in all_chunks if supports(h.text, q.references)]
    if holding:
        return best(holding), "answer"
    return None, (
        "no chunk of the collection contains any reference answer "
        f"({', '.join(repr(r) for r in q.references)}); give the question a `doc_id`"
    )


def _distractors(
    q: RaftQuestion,
    oracle: Hit,
    ranked: Sequence[Hit],
    all_chunks: Sequence[Hit],
    want: int,
    cfg: RaftConfig,
    rng: random.Random,
) -> list[Hit]:
    def eligible(h: Hit) -> bool:
        # a chunk of the oracle's document, or one that holds the answer, is no distractor
        return h.doc_id != oracle.doc_id and not supports(h.text, q.references)

    picked: list[Hit] = []
    if cfg.distractor_source == "retrieved":
        picked = [h for h in ranked if eligible(h)][:want]
    if len(picked) < want:  # random, or retrieval returned too few: draw from the rest
        taken = {_chunk_key(h) for h in picked}
        pool = [h for h in all_chunks if eligible(h) and _chunk_key(h) not in taken]
        picked += rng.sample(pool, min(want - len(picked), len(pool)))
    return picked


def write_jsonl(records: Iterable[dict[str, Any]], path: str | Path) -> int:
    """Write records atomically (a temp file renamed into place); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n
