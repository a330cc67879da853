"""Offline experiments: every question through every arm, scored, timed, persisted.

The main loop is `ExperimentService._run`: questions go `concurrency` at a time, and the
arms of one question are sent together (asyncio.gather), so the scheduler batches them
into the same forward passes (rows of different adapters batch together). Each arm's
request is a ChatCompletionRequest run through the serving layer's chat preparation
(server/serving/chat.py, the same as the chat route's), so an arm's `rag` settings get
exactly the retrieval a client would get; it is streamed, which is how time to first token
is measured.

Records are JSON files under <data_dir>/ab/experiments; an experiment that was running
when the server stopped is marked "interrupted" at the next start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server.ab.metrics import METRICS, latency_summary, mean_ci, paired_bootstrap, score_answer
from server.ab.models import ArmSpec, ExperimentRequest, ExperimentStatus
from server.adapter_validation import AdapterError
from server.errors import APIError
from server.protocol import ChatCompletionRequest, RAGOptions
from server.serving import OpenAIServing
from trainer.atomic import write_json_atomic

logger = logging.getLogger(__name__)

# An arm that names no max_tokens would get the server's default (512): on a base model
# that never ends its turn, every answer runs that long. Such arms get a budget just past
# the longest reference instead, as the trainer's eval does (trainer/common.py
# eval_token_budget): a longer answer cannot match exactly, and cutting it off can only
# raise its token F1 and ROUGE-L.
BUDGET_MARGIN_TOKENS = 8
BUDGET_MAX_TOKENS = 256
ArmCheck = Callable[[str, Any], None]  # (model, rag: a dict or RAGOptions)
TERMINAL = ("completed", "failed", "cancelled", "interrupted")


def default_arms(req: ExperimentRequest, base_model: str) -> list[ArmSpec]:
    """base, base+rag, adapter, adapter+rag: as many as `adapter`/`collection` allow."""
    models = [("base", base_model)] + ([("adapter", req.adapter)] if req.adapter else [])
    arms = []
    for label, model in models:
        arms.append(ArmSpec(name=label, model=model))
        if req.collection:
            arms.append(
                ArmSpec(name=f"{label}+rag", model=model, rag=RAGOptions(collection=req.collection))
            )
    return arms


class ExperimentService:
    def __init__(
        self,
        root: Path,
        *,
        serving: Callable[[], OpenAIServing],
        check_arm: ArmCheck,
        base_model: str,
    ):
        self.root = root
        self.serving = serving
        self.check_arm = check_arm
        self.base_model = base_model
        self.records: dict[str, dict[str, Any]] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}

    # --- persistence ------------------------------------------------------------------

    def recover(self) -> None:
        if not self.root.is_dir():
            return
        for path in sorted(self.root.glob("*.json")):
            try:
                rec = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                logger.warning("ab: unreadable experiment record %s", path)
                continue
            if rec["status"] not in TERMINAL:
                rec["status"] = "interrupted"
                rec["error"] = "the server stopped while this experiment was running"
                self._save(rec)
            self.records[rec["id"]] = rec
        logger.info("ab: %d experiments on disk", len(self.records))

    def _save(self, rec: dict[str, Any]) -> None:
        # readers never see half a record
        write_json_atomic(self.root / f"{rec['id']}.json", rec, indent=None)

    # --- the API ------------------------------------------------------------------------

    def submit(self, req: ExperimentRequest) -> dict[str, Any]:
        arms = req.arms or default_arms(req, self.base_model)
        if len(arms) < 2:
            raise APIError(
                400,
                "an experiment compares at least two arms: give `arms`, or `adapter` and/or "
                "`collection` to build the default ones (base, base+rag, adapter, adapter+rag)",
                param="arms",
            )
        names = [a.name for a in arms]
        if len(set(names)) != len(names):
            raise APIError(400, f"arm names must be unique: {names}", param="arms")
        for i, arm in enumerate(arms):
            try:
                self.check_arm(arm.model, arm.rag)
            except (APIError, AdapterError) as exc:
                exc.param = f"arms.{i}.{exc.param or 'model'}"  # say which arm
                raise
        if req.max_tokens is not None:
            arms = [
                a if a.max_tokens else a.model_copy(update={"max_tokens": req.max_tokens})
                for a in arms
            ]
        budget = None
        if any(a.max_tokens is None for a in arms):
            budget = self.reference_budget(req)
            budget["arms"] = [a.name for a in arms if a.max_tokens is None]
            arms = [
                a if a.max_tokens else a.model_copy(update={"max_tokens": budget["max_tokens"]})
                for a in arms
            ]
        questions = [
            {
                "id": q.id or f"q{i + 1}",
                "question": q.question,
                "references": q.references,
                **({"doc_id": q.doc_id} if q.doc_id is not None else {}),
            }
            for i, q in enumerate(req.questions)
        ]
        rec: dict[str, Any] = {
            "id": f"abx-{uuid.uuid4().hex[:12]}",
            "name": req.name,
            "status": "running",
            "created": int(time.time()),
            "finished": None,
            "progress": {"done": 0, "total": len(questions)},
            "arms": [a.model_dump() for a in arms],
            "seed": req.seed,
            "error": None,
            "summary": None,
            "questions": questions,
            "results": [None] * len(questions),
            # how arms without max_tokens got theirs (None: every arm named its own)
            "budget": budget,
        }
        self.records[rec["id"]] = rec
        self._save(rec)
        self.tasks[rec["id"]] = asyncio.create_task(self._run(rec, arms, req.concurrency))
        logger.info(
            "ab: experiment %s: %d questions x %d arms", rec["id"], len(questions), len(arms)
        )
        return rec

    def reference_budget(self, req: ExperimentRequest) -> dict[str, Any]:
        """max_tokens for arms that name none: the longest reference in tokens, plus a
        margin, at most the server's own default."""
        serving = self.serving()
        longest = max(
            len(serving.ctx.engine.tokenize(ref)) for q in req.questions for ref in q.references
        )
        cap = min(BUDGET_MAX_TOKENS, serving.ctx.default_max_tokens)
        return {
            "max_tokens": max(1, min(cap, longest + BUDGET_MARGIN_TOKENS)),
            "source": "references",
            "longest_reference_tokens": longest,
            "margin": BUDGET_MARGIN_TOKENS,
            "cap": cap,
        }

    def get(self, exp_id: str) -> dict[str, Any]:
        rec = self.records.get(exp_id)
        if rec is None:
            raise APIError(404, f"no experiment with id `{exp_id}`", code="experiment_not_found")
        return rec

    def cancel(self, exp_id: str) -> dict[str, Any]:
        rec = self.get(exp_id)
        task = self.tasks.get(exp_id)
        if task is not None and not task.done():
            task.cancel()  # _run marks it cancelled and saves
        return rec

    async def shutdown(self) -> None:
        for task in self.tasks.values():
            task.cancel()  # records stay "running" on disk: the next start says interrupted
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    @staticmethod
    def status(rec: dict[str, Any], *, detail: bool = True) -> ExperimentStatus:
        data = {k: v for k, v in rec.items() if k not in ("results", "questions", "seed")}
        data["progress"] = dict(rec["progress"])
        data["progress"]["fraction"] = rec["progress"]["done"] / max(1, rec["progress"]["total"])
        if detail:
            data["questions"] = per_question(rec)
        return ExperimentStatus.model_validate(data)

    # --- the main loop ------------------------------------------------------------------

    async def _run(self, rec: dict[str, Any], arms: list[ArmSpec], concurrency: int) -> None:
        gate = asyncio.Semaphore(concurrency)
        last_save = 0.0

        async def one(i: int, q: dict[str, Any]) -> None:
            nonlocal last_save
            async with gate:
                answers = await asyncio.gather(
                    *(self._ask(arm, q["question"], rec["seed"]) for arm in arms)
                )
            for answer in answers:
                answer["scores"] = score_answer(answer["answer"], q["references"])
            rec["results"][i] = answers
            rec["progress"]["done"] += 1
            if time.monotonic() - last_save > 1.0:  # progress on disk, at most once a second
                last_save = time.monotonic()
                self._save(rec)

        try:
            await asyncio.gather(*(one(i, q) for i, q in enumerate(rec["questions"])))
            rec["summary"] = summarize(rec)
            rec["status"] = "completed"
        except asyncio.CancelledError:
            rec["status"] = "cancelled"
            raise
        except Exception as exc:
            logger.exception("ab: experiment %s failed", rec["id"])
            rec["status"], rec["error"] = "failed", str(exc)
        finally:
            if rec["status"] != "running":
                rec["finished"] = int(time.time())
                self._save(rec)
            logger.info("ab: experiment %s %s", rec["id"], rec["status"])

    async def _ask(self, arm: ArmSpec, question: str, seed: int) -> dict[str, Any]:
        """One answer, streamed: text, latency, time to first token, usage, documents."""
        req = ChatCompletionRequest(
            model=arm.model,
            messages=[{"role": "user", "content": question}],  # type: ignore[list-item]
            temperature=arm.temperature,
            max_tokens=arm.max_tokens,
            stop=arm.stop,
            seed=seed,
            rag=arm.rag,
            stream=True,
            stream_options={"include_usage": True},  # type: ignore[arg-type]
        )
        out: dict[str, Any] = {
            "arm": arm.name,
            "answer": "",
            "latency_s": None,
            "ttft_s": None,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "doc_ids": [],
            "error": None,
        }
        # the clock starts before preparation: retrieval is part of what a RAG arm costs
        start = time.monotonic()
        parts: list[str] = []
        try:
            chat = self.serving().chat
            prep = await chat.prepare(req)
            async for event in chat.stream(prep, include_usage=True):
                if not event.startswith("data: {"):
                    continue
                obj = json.loads(event[len("data: ") :])
                if "error" in obj:
                    out["error"] = obj["error"]["message"]
                for c in obj.get("citations") or []:  # on the first chunk, or its own event
                    doc = c.get("doc_id") or c.get("id")
                    if doc is not None and doc not in out["doc_ids"]:
                        out["doc_ids"].append(doc)
                for choice in obj.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        if out["ttft_s"] is None:
                            out["ttft_s"] = time.monotonic() - start
                        parts.append(text)
                if obj.get("usage"):
                    out["prompt_tokens"] = obj["usage"]["prompt_tokens"]
                    out["completion_tokens"] = obj["usage"]["completion_tokens"]
        except (APIError, AdapterError) as exc:
            out["error"] = exc.message
        out["latency_s"] = time.monotonic() - start
        if out["ttft_s"] is None:  # an empty answer: its first token is its end
            out["ttft_s"] = out["latency_s"]
        out["answer"] = "".join(parts)
        if out["error"]:
            logger.warning("ab: arm %s failed on a question: %s", arm.name, out["error"])
        return out


def per_question(rec: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for q, answers in zip(rec["questions"], rec["results"], strict=True):
        rows.append({**q, "answers": answers})
    return rows


def summarize(rec: dict[str, Any]) -> dict[str, Any]:
    """Per arm: mean scores (with bootstrap CIs), latency, tokens; each arm vs the first.

    A failed answer scores 0 on every metric and is counted in `errors`: leaving it out
    would make an arm that fails on hard questions look better.
    """
    seed = rec.get("seed", 0)
    names = [a["name"] for a in rec["arms"]]
    done = [r for r in rec["results"] if r is not None]
    col = {n: [row[i] for row in done] for i, n in enumerate(names)}
    scores = {n: {m: [a["scores"][m] for a in col[n]] for m in METRICS} for n in names}
    arms = {}
    for n in names:
        answers = col[n]
        arms[n] = {
            "n": len(answers),
            "errors": sum(1 for a in answers if a["error"]),
            "scores": {m: mean_ci(scores[n][m], seed=seed) for m in METRICS},
            "latency_s": latency_summary([a["latency_s"] for a in answers]),
            "ttft_s": latency_summary([a["ttft_s"] for a in answers]),
            "prompt_tokens": sum(a["prompt_tokens"] for a in answers),
            "completion_tokens": sum(a["completion_tokens"] for a in answers),
            "retrieval_hit_rate": _hit_rate(rec, n, names.index(n)),
        }
    baseline = names[0]
    comparisons = [
        {
            "arm": n,
            "baseline": baseline,
            **{m: paired_bootstrap(scores[baseline][m], scores[n][m], seed=seed) for m in METRICS},
        }
        for n in names[1:]
    ]
    return {
        "arms": arms,
        "comparisons": comparisons,
        "bootstrap": {"resamples": 1000, "confidence": 0.95},
    }


def _hit_rate(rec: dict[str, Any], arm: str, column: int) -> float | None:
    """Of the questions that name their `doc_id`, the share whose answer in this arm was
    given with that document among the retrieved ones; None for an arm without `rag` or a
    question set without doc ids."""
    spec = next(a for a in rec["arms"] if a["name"] == arm)
    if not spec.get("rag"):
        return None
    pairs = [
        (q["doc_id"], row[column]["doc_ids"])
        for q, row in zip(rec["questions"], rec["results"], strict=True)
        if row is not None and q.get("doc_id")
    ]
    if not pairs:
        return None
    return sum(doc in docs for doc, docs in pairs) / len(pairs)


def make_arm_check(state: Any) -> ArmCheck:
    """The 404s for an arm naming a model or a collection this server does not have."""

    def check(model: str, rag: Any) -> None:
        if rag is not None and not isinstance(rag, dict):  # an arm's RAGOptions
            rag = rag.model_dump()
        serving = getattr(state, "serving", None)
        if serving is None:
            raise APIError(503, "the base model is still loading", code="model_loading")
        serving.resolve_model(model)  # AdapterError 404 model_not_found
        if rag is None:
            return
        collection = rag.get("collection")
        if not isinstance(collection, str) or not collection:
            raise APIError(400, "`rag` needs a `collection`", param="rag.collection")
        # duck-typed: the retrieval service (app.state.rag) lands from another branch
        store = getattr(getattr(state, "rag", None), "store", None)
        if store is None or not store.exists(collection):
            why = "" if store is not None else " (retrieval is not enabled on this server)"
            raise APIError(
                404,
                f"The collection `{collection}` does not exist{why}.",
                param="rag.collection",
                code="collection_not_found",
            )

    return check
