"""Locust users of the soak: greedy marker-checked requests (some through the A/B split,
with feedback on most of those), structured output, tools, RAG and clients that hang up
mid-stream. Every answer is written to a JSONL file
(SOAK_ANSWERS) and checked afterwards by the runner against the adapters' markers and
the churn's history; locust's own statistics and HTML report count the outcomes.

SOAK_MODELS       comma-separated `model` ids to draw from (base and adapters)
SOAK_MAX_TOKENS   max_tokens of every marker-checked request
SOAK_API_KEY      Bearer key (inference scope)
SOAK_ANSWERS      the JSONL file each answer is appended to
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from typing import Any

from locust import HttpUser, between

from loadtests._requests import CHAT_PATH, chunk_text, sse_events
from loadtests.soak.common import (
    CHAT_PROMPTS,
    CITY_SCHEMA,
    COMPLETION_PROMPTS,
    MARKED_KINDS,
    RAG_PROMPTS,
    SPLIT,
    WEATHER_TOOL,
    answer_text,
    marked_body,
    record_line,
)

MODELS = [m for m in os.environ.get("SOAK_MODELS", "base").split(",") if m]
MAX_TOKENS = int(os.environ.get("SOAK_MAX_TOKENS", "8"))
API_KEY = os.environ.get("SOAK_API_KEY") or None
_answers = open(os.environ.get("SOAK_ANSWERS", os.devnull), "a", buffering=1)  # noqa: SIM115
TIMEOUT_S = 180.0
SSE_STATUS = {"rate_limit_error": 429, "invalid_request_error": 400, "permission_error": 403}
SPLIT_USERS = 12  # distinct `user` ids sent through the split (each sticks to one arm)
FEEDBACK_SHARE = 0.6  # of the split's answers, those rated
PROMPTS = {"chat": CHAT_PROMPTS, "completion": COMPLETION_PROMPTS, "chat_rag": RAG_PROMPTS}


def _write(**fields: Any) -> None:
    _answers.write(record_line(**fields))


class SoakUser(HttpUser):
    wait_time = between(0.1, 0.6)

    def on_start(self) -> None:
        if API_KEY:
            self.client.headers["Authorization"] = f"Bearer {API_KEY}"

    # --- marker-checked: greedy, fixed prompt, answer known per adapter weights ----------

    def _marked(
        self, kind: str, *, stream: bool, model: str | None = None, user: str | None = None
    ) -> dict | None:
        """One marker-checked request; its record (None when it got no 2xx answer)."""
        model = model or random.choice(MODELS)
        prompt_i = random.randrange(len(PROMPTS[kind]))
        path, _ = MARKED_KINDS[kind]
        body = marked_body(kind, model, prompt_i, MAX_TOKENS, stream, user=user)
        split = " split" if model.startswith("ab:") else ""
        name = f"{kind}{split}{' stream' if stream else ''}"
        if stream:
            return self._stream(path, body, name, kind=kind, model=model, prompt_i=prompt_i)
        return self._plain(path, body, name, kind=kind, model=model, prompt_i=prompt_i)

    def _plain(self, path: str, body: dict, name: str, **rec: Any) -> dict | None:
        """A non-streamed request; the answer's record (None when it got no 2xx answer)."""
        t0 = time.time()
        with self.client.post(
            path, json=body, name=name, catch_response=True, timeout=TIMEOUT_S
        ) as resp:
            status = resp.status_code
            t1 = time.time()
            if not 200 <= status < 300:
                resp.failure(f"HTTP {status}: {(resp.text or '')[:160]}")
                _write(
                    t0=t0, t1=t1, stream=False, status=status, error=(resp.text or "")[:300], **rec
                )
                return None
            try:
                data = resp.json()
                text = answer_text(rec["kind"], data) if rec["kind"] in PROMPTS else ""
                tokens = int(data["usage"]["completion_tokens"])
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                resp.failure(f"bad body: {exc!r}")
                _write(t0=t0, t1=t1, stream=False, status=status, error=f"bad body: {exc!r}", **rec)
                return None
            resp.success()
        out = dict(t0=t0, t1=t1, stream=False, status=status, text=text, tokens=tokens,
                   finish=data["choices"][0].get("finish_reason"), **rec,
                   **_split_fields(rec["model"], data))  # fmt: skip
        _write(**out)
        return {**out, "data": data}

    def _stream(
        self, path: str, body: dict, name: str, *, hang_up: bool = False, **rec: Any
    ) -> dict | None:
        """A streamed request; the answer's record (None when it got no whole 2xx answer)."""
        t0 = time.time()
        first: float | None = None
        parts: list[str] = []
        tokens = None
        finish = None
        done = False
        head: dict = {}  # the first chunk: its id, model and (under a split) ab_arm
        chat = rec["kind"] != "completion"
        with self.client.post(
            path, json=body, name=name, stream=True, catch_response=True, timeout=TIMEOUT_S
        ) as resp:
            status = resp.status_code
            if not 200 <= status < 300:
                resp.failure(f"HTTP {status}: {(resp.text or '')[:160]}")
                _write(t0=t0, t1=time.time(), stream=True, status=status,
                       error=(resp.text or "")[:300], **rec)  # fmt: skip
                return None
            try:
                for event in sse_events(resp.iter_lines()):
                    if event is None:
                        done = True
                        break
                    if "error" in event:
                        # the server refuses after the headers went out (the queue is
                        # full, the adapter was deleted while waiting): its error shape in
                        # the stream, recorded with the status that shape stands for
                        err = event["error"]
                        resp.failure(f"SSE error: {json.dumps(err)[:160]}")
                        _write(t0=t0, t1=time.time(), stream=True, sse_error=True,
                               status=SSE_STATUS.get(err.get("type"), 500),
                               error=json.dumps(err)[:300], **rec)  # fmt: skip
                        return None
                    head = head or event
                    if event.get("usage"):
                        tokens = int(event["usage"]["completion_tokens"])
                    for choice in event.get("choices") or []:
                        finish = choice.get("finish_reason") or finish
                    piece = chunk_text(event, chat=chat)
                    if piece:
                        first = first or time.time()
                        parts.append(piece)
                        if hang_up:
                            break
            except Exception as exc:  # a broken stream is a failure, and recorded
                resp.failure(f"stream broke: {exc!r}")
                _write(t0=t0, t1=time.time(), stream=True, status=599, error=repr(exc)[:300], **rec)
                return None
            t1 = time.time()
            resp.request_meta["response_time"] = (t1 - t0) * 1000
            if hang_up:
                resp.close()  # the client goes away mid-stream: the server must free the row
                resp.success()
                _write(t0=t0, t1=t1, stream=True, status=status, hung_up=True, **rec)
                return None
            if not done or tokens is None:
                resp.failure("stream ended without [DONE] or usage")
                _write(t0=t0, t1=t1, stream=True, status=598, error="no [DONE]/usage", **rec)
                return None
            resp.success()
        out = dict(t0=t0, t1=t1, stream=True, status=status, text="".join(parts), tokens=tokens,
                   finish=finish, ttft_ms=None if first is None else (first - t0) * 1000, **rec,
                   **_split_fields(rec["model"], head))  # fmt: skip
        _write(**out)
        return {**out, "data": head}

    # --- tasks ---------------------------------------------------------------------------

    def chat(self) -> None:
        self._marked("chat", stream=False)

    def chat_stream(self) -> None:
        self._marked("chat", stream=True)

    def completion(self) -> None:
        self._marked("completion", stream=False)

    def completion_stream(self) -> None:
        self._marked("completion", stream=True)

    def split(self) -> None:
        """Through the A/B split: a sticky user id, and feedback on most answers."""
        kind = random.choice(["chat", "completion"])
        user = f"soak-user-{random.randrange(SPLIT_USERS)}"
        rec = self._marked(kind, stream=random.random() < 0.5, model=f"ab:{SPLIT}", user=user)
        if rec is None or random.random() >= FEEDBACK_SHARE:
            return
        t0 = time.time()
        with self.client.post(
            "/ab/feedback",
            json={"response_id": rec["data"]["id"], "rating": random.choice([1, -1])},
            name="ab feedback",
            catch_response=True,
            timeout=60,
        ) as resp:
            status = resp.status_code
            if status == 200:
                resp.success()
            else:
                resp.failure(f"HTTP {status}: {(resp.text or '')[:160]}")
        _write(kind="feedback", model=f"ab:{SPLIT}", arm=rec.get("arm"), t0=t0, t1=time.time(),
               status=status, response_id=rec["data"]["id"])  # fmt: skip

    def chat_rag(self) -> None:
        self._marked("chat_rag", stream=random.random() < 0.5, model="base")

    def structured(self) -> None:
        model = random.choice(MODELS)
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "Name a city as JSON."}],
            "max_tokens": 48,
            "temperature": 0,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "city", "schema": CITY_SCHEMA, "strict": True},
            },
        }
        rec = self._plain(CHAT_PATH, body, "structured", kind="structured", model=model)
        data = rec and rec["data"]
        if data is not None and data["choices"][0].get("finish_reason") == "stop":
            _check_json(data["choices"][0]["message"]["content"], "structured", model)

    def tool(self) -> None:
        model = random.choice(MODELS)
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
            "max_tokens": 48,
            "temperature": 0,
            "tools": [WEATHER_TOOL],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        }
        rec = self._plain(CHAT_PATH, body, "tool", kind="tool", model=model)
        data = rec and rec["data"]
        if data is not None and data["choices"][0].get("finish_reason") in ("stop", "tool_calls"):
            calls = data["choices"][0]["message"].get("tool_calls") or []
            if not calls or calls[0]["function"]["name"] != "get_weather":
                _write(
                    kind="tool_check", model=model, ok=False, error=f"no get_weather call: {calls}"
                )
            else:
                _check_json(calls[0]["function"]["arguments"], "tool", model)

    def hang_up(self) -> None:
        model = random.choice(MODELS)
        body = marked_body("chat", model, 0, 64, True)
        self._stream(CHAT_PATH, body, "hang up mid-stream", hang_up=True,
                     kind="hang_up", model=model)  # fmt: skip

    tasks: dict[Callable[..., None], int] = {  # type: ignore[assignment]
        chat: 3,
        chat_stream: 3,
        completion: 2,
        completion_stream: 2,
        chat_rag: 1,
        structured: 1,
        tool: 1,
        hang_up: 1,
        split: 2,
    }


def _split_fields(model: str, data: dict) -> dict:
    """What a split answer says of its routing: the arm and the model that served it."""
    if not model.startswith("ab:"):
        return {}
    return {"arm": data.get("ab_arm"), "served_by": data.get("model"), "id": data.get("id")}


def _check_json(text: str, kind: str, model: str) -> None:
    """A finished constrained answer must parse and fit the schema (`city`, a string)."""
    try:
        value = json.loads(text)
        good = isinstance(value, dict) and set(value) == {"city"} and isinstance(value["city"], str)
    except ValueError:
        good = False
    _write(kind=f"{kind}_check", model=model, ok=good, error=None if good else text[:200])
