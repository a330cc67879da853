"""Online A/B: split live chat traffic between arms, sticky per user, and collect feedback.

A chat or completions request for model `ab:<split>` is rewritten to one arm's model (and
`rag`) before anything else looks at it (the serving layer's `prepare`, server/serving/). The response
id is fixed at that point, so a client can send feedback for it; the finished answer is
logged with the prompt, and rated or compared answers become DPO preference pairs
(``preference_pairs``) or KTO rated answers (``rated_answers``).

On disk, under <data_dir>/ab/: splits.json, and per split responses.jsonl and
feedback.jsonl (append-only, replayed at start).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from pydantic import ValidationError

from server.ab.models import FeedbackRequest, Split, SplitArm, SplitRequest
from server.errors import APIError
from server.protocol import ChatCompletionRequest, CompletionRequest, RAGOptions, new_id
from server.serving.base import AB_PREFIX
from server.serving.chat import chat_messages
from trainer.atomic import write_json_atomic
from trainer.formats import Problem, parse_line

logger = logging.getLogger(__name__)


def assign_arm(split: str, weights: Sequence[float], user: str | None) -> int:
    """The arm index for `user`: sticky (a hash of user and split), else random.

    The split name is in the hash so one user is not always in the first arm of every
    split; 8 bytes of sha256 give a uniform point in [0, 1) to place on the weights.
    """
    total = sum(weights)
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    if user is None:
        point = random.random()
    else:
        digest = hashlib.sha256(f"{split}\x00{user}".encode()).digest()
        point = int.from_bytes(digest[:8], "big") / 2**64
    target = point * total
    for i, acc in enumerate(itertools.accumulate(weights)):
        if target < acc:
            return i
    return max(i for i, w in enumerate(weights) if w > 0)  # float round-off at the top


Req = TypeVar("Req", ChatCompletionRequest, CompletionRequest)


@dataclass
class Routed(Generic[Req]):
    """A request rewritten to one arm, and what to do once it is prepared."""

    request: Req
    attach: Callable[[Any], None]


class SplitService:
    def __init__(self, root: Path, *, check_arm: Callable[[str, Any], None]):
        self.root = root
        self.check_arm = check_arm  # raises the 404 for an unknown model or collection
        self.splits: dict[str, Split] = {}
        self.responses: dict[str, dict[str, Any]] = {}
        self.feedback: list[dict[str, Any]] = []
        self._lock = threading.Lock()  # on_complete may run from any task; files append

    # --- persistence ------------------------------------------------------------------

    @property
    def _index(self) -> Path:
        return self.root / "splits.json"

    def recover(self) -> None:
        if self._index.is_file():
            raw = json.loads(self._index.read_text())
            self.splits = {s["name"]: Split.model_validate(s) for s in raw.get("splits", [])}
        for name in self.splits:
            for rec in _read_jsonl(self._dir(name) / "responses.jsonl"):
                self.responses[rec["id"]] = rec
            self.feedback.extend(_read_jsonl(self._dir(name) / "feedback.jsonl"))
        logger.info("ab: %d splits, %d logged responses", len(self.splits), len(self.responses))

    def _save_index(self) -> None:
        # a crash leaves the old index or the new one
        write_json_atomic(self._index, {"splits": [s.model_dump() for s in self.splits.values()]})

    def _dir(self, split: str) -> Path:
        return self.root / "splits" / split

    def _append(self, split: str, file: str, record: dict[str, Any]) -> None:
        path = self._dir(split) / file
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    # --- splits -----------------------------------------------------------------------

    def create(self, req: SplitRequest) -> Split:
        if req.name in self.splits and not req.replace:
            raise APIError(
                409,
                f"split `{req.name}` exists; send replace=true to replace it",
                param="name",
                code="split_exists",
            )
        names = [a.name for a in req.arms]
        if len(set(names)) != len(names):
            raise APIError(400, "arm names must be unique", param="arms", code="invalid_arms")
        if not sum(a.weight for a in req.arms) > 0:
            raise APIError(
                400,
                "arm weights must sum to a positive number (give at least one arm weight > 0)",
                param="arms",
                code="invalid_weights",
            )
        for i, arm in enumerate(req.arms):
            if arm.rag is not None:
                try:
                    RAGOptions.model_validate(arm.rag)
                except ValidationError as exc:
                    err = exc.errors()[0]
                    where = ".".join(str(p) for p in err["loc"])
                    raise APIError(
                        400,
                        f"arms.{i}.rag: {err['msg']}" + (f" ({where})" if where else ""),
                        param=f"arms.{i}.rag" + (f".{where}" if where else ""),
                    ) from exc
            self.check_arm(arm.model, arm.rag)
        split = Split(
            name=req.name, model=AB_PREFIX + req.name, arms=req.arms, created=int(time.time())
        )
        with self._lock:
            self.splits[req.name] = split
            self._save_index()
        logger.info("ab: split %s with arms %s", req.name, ", ".join(names))
        return split

    def get(self, name: str) -> Split:
        split = self.splits.get(name)
        if split is None:
            raise APIError(404, f"no split named `{name}`", param="name", code="split_not_found")
        counts = {a.name: 0 for a in split.arms}
        for rec in self.responses.values():
            if rec["split"] == name and rec["arm"] in counts:
                counts[rec["arm"]] += 1
        feedback = {a.name: 0 for a in split.arms}
        for entry in self.feedback:
            rated = self.responses.get(entry["response_id"])
            if entry["split"] == name and rated is not None and rated["arm"] in feedback:
                feedback[rated["arm"]] += 1
        return split.model_copy(update={"counts": counts, "feedback": feedback})

    def route(self, body: Req) -> Routed[Req]:
        """Chat or completions: the arm for this request's user, and the hook that tags and
        logs the response. A completion is logged with its prompt string (DPO pairs take a
        string prompt as well as a conversation), so it must be a single string."""
        name = body.model[len(AB_PREFIX) :]
        split = self.splits.get(name)
        if split is None:
            raise APIError(
                404,
                f"The model `{body.model}` does not exist: no A/B split named `{name}`.",
                param="model",
                code="model_not_found",
            )
        prompt: str | list[dict[str, str]]
        if isinstance(body, ChatCompletionRequest):
            prompt = chat_messages(body)  # plain {role, content}: what the DPO loader reads
            response_id = new_id("chatcmpl")
        else:
            if not isinstance(body.prompt, str):
                raise APIError(
                    400,
                    f"with an A/B model (`{body.model}`), prompt must be a single string: "
                    "the answer is logged against it for feedback",
                    param="prompt",
                )
            prompt = body.prompt
            response_id = new_id("cmpl")
        arm = split.arms[assign_arm(name, [a.weight for a in split.arms], body.user)]
        # model_copy does not validate: the arm's `rag` dict becomes RAGOptions here
        rag = RAGOptions.model_validate(arm.rag) if arm.rag is not None else body.rag
        request = body.model_copy(update={"model": arm.model, "rag": rag})

        def attach(prep: Any) -> None:
            prep.response_id = response_id
            prep.ab_arm = arm.name
            prep.on_complete = lambda text: self._record(
                response_id, name, arm, prompt, text, body.user
            )

        return Routed(request=request, attach=attach)

    def _record(
        self,
        response_id: str,
        split: str,
        arm: SplitArm,
        prompt: str | list[dict[str, str]],
        completion: str,
        user: str | None,
    ) -> None:
        rec = {
            "id": response_id,
            "split": split,
            "arm": arm.name,
            "model": arm.model,
            "prompt": prompt,
            "completion": completion,
            "user": user,
            "created": int(time.time()),
        }
        with self._lock:
            self.responses[response_id] = rec
            self._append(split, "responses.jsonl", rec)

    # --- feedback -----------------------------------------------------------------------

    def _response(self, response_id: str, param: str) -> dict[str, Any]:
        rec = self.responses.get(response_id)
        if rec is None:
            raise APIError(
                404,
                f"no A/B response with id `{response_id}` (feedback is taken for responses "
                "served under a split, once they have finished)",
                param=param,
                code="response_not_found",
            )
        return rec

    def add_feedback(self, fb: FeedbackRequest) -> dict[str, Any]:
        rec = self._response(fb.response_id, "response_id")
        if fb.rating is None and fb.preferred_over is None:
            raise APIError(
                400, "give a rating (-1 or 1) or preferred_over", param="rating", code="invalid"
            )
        if fb.preferred_over is not None:
            other = self._response(fb.preferred_over, "preferred_over")
            if other["id"] == rec["id"]:
                raise APIError(
                    400, "a response cannot be preferred over itself", param="preferred_over"
                )
            if other["split"] != rec["split"] or other["prompt"] != rec["prompt"]:
                raise APIError(
                    400,
                    "preferred_over must name a response to the same prompt in the same split",
                    param="preferred_over",
                )
        entry = {
            "response_id": rec["id"],
            "split": rec["split"],
            "rating": fb.rating,
            "preferred_over": fb.preferred_over,
            "created": int(time.time()),
        }
        with self._lock:
            self.feedback.append(entry)
            self._append(rec["split"], "feedback.jsonl", entry)
        return rec

    def preference_pairs(self, split: str) -> Export:
        """DPO lines {prompt, chosen, rejected}: explicit comparisons first, then every
        (liked, disliked) pair of answers to one prompt. The prompt is the conversation
        the client sent, before any retrieval: that is what the next adapter will see."""
        self.get(split)  # 404 for an unknown split
        seen: set[tuple[str, str]] = set()
        ratings: dict[str, int] = {}
        pairs: list[tuple[str, str]] = []
        for fb in self.feedback:
            if fb["split"] != split:
                continue
            if fb["rating"] is not None:
                ratings[fb["response_id"]] = fb["rating"]  # the latest rating counts
            if fb["preferred_over"] is not None:
                pair = (fb["response_id"], fb["preferred_over"])
                if pair not in seen:
                    seen.add(pair)
                    pairs.append(pair)
        by_prompt: dict[str, tuple[list[str], list[str]]] = {}
        for rid, rating in ratings.items():
            key = json.dumps(self.responses[rid]["prompt"], sort_keys=True)
            liked, disliked = by_prompt.setdefault(key, ([], []))
            (liked if rating > 0 else disliked).append(rid)
        for liked, disliked in by_prompt.values():
            for pair in itertools.product(liked, disliked):
                if pair not in seen:
                    seen.add(pair)
                    pairs.append(pair)
        export = Export(split=split, kind="dpo", rated=len(ratings) + len(pairs))
        for chosen_id, rejected_id in pairs:
            chosen = self.responses[chosen_id]
            rejected = self.responses[rejected_id]
            if chosen["completion"] == rejected["completion"]:
                export.leave_out(chosen_id, "chosen and rejected are the same text")
                continue
            export.add(
                chosen_id,
                {
                    "prompt": chosen["prompt"],
                    "chosen": _answer(chosen),
                    "rejected": _answer(rejected),
                },
            )
        return export

    def rated_answers(self, split: str) -> Export:
        """KTO lines {prompt, completion, label}: every rated answer once, label true for a
        thumbs up. The latest rating of an answer counts; an answer that was only compared
        counts as liked when it won its latest comparison and disliked when it lost. Unlike
        DPO pairs, an answer needs no other answer to the same prompt: every rating is a
        training line."""
        self.get(split)  # 404 for an unknown split
        rated: dict[str, bool] = {}
        compared: dict[str, bool] = {}
        for fb in self.feedback:
            if fb["split"] != split:
                continue
            if fb["rating"] is not None:
                rated[fb["response_id"]] = fb["rating"] > 0
            if fb["preferred_over"] is not None:
                compared[fb["response_id"]] = True
                compared[fb["preferred_over"]] = False
        labels = {**compared, **rated}
        export = Export(split=split, kind="kto", rated=len(labels))
        for rid, label in labels.items():
            rec = self.responses[rid]
            export.add(rid, {"prompt": rec["prompt"], "completion": _answer(rec), "label": label})
        return export


@dataclass
class Export:
    """One split's feedback as training lines, each checked by the trainer's own parser
    (``trainer.formats.parse_line``), so the file `swapserve train` reads is never refused
    for a line the server wrote. A line the trainer would refuse (an empty answer, a
    conversation it cannot train on) is left out and named with its reason."""

    split: str
    kind: Literal["dpo", "kto"]
    rated: int  # answers rated (kto) or ratings and comparisons (dpo) in the split
    lines: list[dict[str, Any]] = field(default_factory=list)
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (response id, reason)

    def add(self, response_id: str, line: dict[str, Any]) -> None:
        problems: list[Problem] = []
        parse_line(line, len(self.lines) + 1, self.kind, problems)
        if problems:
            self.leave_out(response_id, "; ".join(f"{p.field}: {p.message}" for p in problems))
        else:
            self.lines.append(line)

    def leave_out(self, response_id: str, reason: str) -> None:
        logger.warning("ab: %s export of %s leaves out %s: %s", self.kind, self.split,
                       response_id, reason)  # fmt: skip
        self.left_out.append((response_id, reason))

    def jsonl(self) -> str:
        """The lines as JSONL; a 404 naming why when there is none (an empty file would
        only fail later, in the trainer, as an empty dataset)."""
        if self.lines:
            return "".join(json.dumps(line) + "\n" for line in self.lines)
        what = "rated answers" if self.kind == "kto" else "preference pairs"
        if self.rated == 0:
            how = (
                "rate answers served under it with POST /ab/feedback "
                '{"response_id", "rating": 1 or -1}'
            )
            if self.kind == "dpo":
                how += (
                    ' or compare two answers to one prompt ("preferred_over"); a pair needs a '
                    "liked and a disliked answer to the same prompt"
                )
            message = f"split `{self.split}` has no feedback to export yet: {how}"
        elif not self.left_out:
            message = (
                f"split `{self.split}` has feedback but no {what}: a pair needs a liked and a "
                "disliked answer to the same prompt, or a comparison (preferred_over); "
                f"GET /ab/splits/{self.split}/kto.jsonl takes every rating on its own"
            )
        else:
            rid, reason = self.left_out[0]
            message = (
                f"split `{self.split}` has no {what} the trainer accepts: "
                f"{len(self.left_out)} left out (first: {rid}: {reason})"
            )
        raise APIError(404, message, param="name", code="no_feedback")


def _answer(rec: dict[str, Any]) -> str | list[dict[str, str]]:
    """A logged answer as the line's completion: an assistant message after a conversation
    (TRL's conversational format concatenates prompt and completion lists), the text after
    a completion's prompt string."""
    if isinstance(rec["prompt"], list):
        return [{"role": "assistant", "content": rec["completion"]}]
    return rec["completion"]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line from a crash: skip it
            logger.warning("ab: skipping a malformed line in %s", path)
    return out
