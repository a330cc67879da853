"""Locust scenario for swapserve: mixed chat/completions, streamed or not, over many adapters.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000

`loadtests/run_loadtest.py` starts a server, registers adapters and sets these for you:

SWAPSERVE_LT_ADAPTERS        comma-separated `model` ids to spread requests over (default: base)
SWAPSERVE_LT_RAG_COLLECTION  a RAG collection name; unset = the RAG tasks are left out
SWAPSERVE_LT_SPARE_PATH      a PEFT folder on the server; unset = no register/unregister task
SWAPSERVE_LT_MAX_TOKENS      "lo,hi": max_tokens drawn per request (default 16,32)
SWAPSERVE_LT_API_KEY         sent as a Bearer token when set
SWAPSERVE_LT_SUMMARY         a JSON file written at the end: per-row stats, errors, tokens

Besides the HTTP rows, the statistics hold custom rows (request_type "TTFT" and "TOKS"):
TTFT rows carry milliseconds to the first content token of a streamed request; TOKS rows
carry a request's completion tokens per second in the response-time column (locust only
has one numeric column, so read those as tok/s, not ms).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from locust import HttpUser, between, events
from locust.env import Environment

# locust puts this file's folder on sys.path, not the repository's
if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests._requests import (  # noqa: E402
    CHAT_PATH,
    COMPLETION_PATH,
    chunk_text,
    request_body,
    sse_events,
)

ADAPTERS: list[str] = [
    a.strip() for a in os.environ.get("SWAPSERVE_LT_ADAPTERS", "base").split(",") if a.strip()
]
RAG_COLLECTION: str | None = os.environ.get("SWAPSERVE_LT_RAG_COLLECTION") or None
SPARE_PATH: str | None = os.environ.get("SWAPSERVE_LT_SPARE_PATH") or None
_lo, _hi = os.environ.get("SWAPSERVE_LT_MAX_TOKENS", "16,32").split(",")
MAX_TOKENS: tuple[int, int] = (int(_lo), int(_hi))
API_KEY: str | None = os.environ.get("SWAPSERVE_LT_API_KEY") or None
SUMMARY_PATH: str | None = os.environ.get("SWAPSERVE_LT_SUMMARY") or None
# A generous bound: on 2 shared CPU cores a queued request can wait tens of seconds, and
# we want to see that wait in the figures rather than as a client-side timeout.
REQUEST_TIMEOUT_S = 180.0

PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about a lighthouse.",
    "List three uses of a paperclip.",
    "What is the capital of France, and what is it known for?",
    "Summarise the plot of a detective story in one paragraph.",
    "Give one tip for writing clear error messages.",
]
COMPLETION_PROMPTS = [
    "Once upon a time, in a small village by the sea,",
    "The three most important rules of cooking are",
    "In computer science, a hash table is",
    "The train left the station at dawn, and",
]

# Run-wide counters for the summary file. Locust runs every user as a greenlet in one
# process, so plain integers need no lock.
_totals: dict[str, float] = {"completion_tokens": 0, "started": 0.0, "stopped": 0.0}
# Raw samples, so the runner can take exact percentiles across all streamed kinds
# (locust keeps percentiles per row only, and rounds them).
_ttft_ms: list[float] = []
_tok_s: list[float] = []
_spare_ids = itertools.count()


@events.test_start.add_listener
def _on_start(environment: Environment, **_: Any) -> None:
    _totals.update(completion_tokens=0, started=time.time(), stopped=0.0)
    _ttft_ms.clear()
    _tok_s.clear()


@events.test_stop.add_listener
def _on_stop(environment: Environment, **_: Any) -> None:
    # Written here rather than read back from locust's CSV: test_stop fires after the
    # in-flight requests drained (--stop-timeout), when every row is final.
    _totals["stopped"] = time.time()
    if not SUMMARY_PATH:
        return
    elapsed = max(_totals["stopped"] - _totals["started"], 1e-9)
    rows = [
        {
            "type": e.method,
            "name": e.name,
            "requests": e.num_requests,
            "failures": e.num_failures,
            "p50": e.get_response_time_percentile(0.5) if e.num_requests else None,
            "p95": e.get_response_time_percentile(0.95) if e.num_requests else None,
        }
        for e in environment.stats.entries.values()
    ]
    errors = [
        {"type": e.method, "name": e.name, "error": str(e.error), "count": e.occurrences}
        for e in environment.stats.errors.values()
    ]
    Path(SUMMARY_PATH).write_text(
        json.dumps(
            {
                "elapsed_s": elapsed,
                "completion_tokens": int(_totals["completion_tokens"]),
                "ttft_ms": _ttft_ms,
                "tok_s": _tok_s,
                "rows": rows,
                "errors": errors,
            },
            indent=1,
        )
    )


class SwapserveUser(HttpUser):
    """One client of an application: mostly chat, some completions, a little admin."""

    # Think time keeps users from hammering in a tight loop; the server is the bottleneck
    # anyway (a few tokens/s per stream on CPU), so a short pause changes little.
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        if API_KEY:
            self.client.headers["Authorization"] = f"Bearer {API_KEY}"

    # --- helpers -------------------------------------------------------------------------

    def _metric(self, kind: str, name: str, value: float) -> None:
        """A custom row in locust's statistics (see the module docstring)."""
        self.environment.events.request.fire(
            request_type=kind,
            name=name,
            response_time=value,
            response_length=0,
            exception=None,
            context={},
        )

    def _body(self, *, chat: bool, stream: bool, rag: bool) -> dict[str, Any]:
        return request_body(
            random.choice(ADAPTERS),
            random.choice(PROMPTS if chat else COMPLETION_PROMPTS),
            chat=chat,
            max_tokens=random.randint(*MAX_TOKENS),
            temperature=0.7,
            stream=stream,
            rag={"collection": RAG_COLLECTION, "top_k": 2} if rag else None,
        )

    def _plain(self, path: str, body: dict[str, Any], name: str) -> None:
        started = time.perf_counter()
        with self.client.post(
            path, json=body, name=name, catch_response=True, timeout=REQUEST_TIMEOUT_S
        ) as resp:
            if not 200 <= resp.status_code < 300:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            try:
                tokens = int(resp.json()["usage"]["completion_tokens"])
            except (ValueError, KeyError, TypeError) as exc:
                resp.failure(f"no usage in the response: {exc!r}")
                return
            resp.success()
        elapsed = time.perf_counter() - started
        _totals["completion_tokens"] += tokens
        if tokens:
            _tok_s.append(tokens / elapsed)
            self._metric("TOKS", name, tokens / elapsed)

    def _stream(self, path: str, body: dict[str, Any], name: str, *, chat: bool) -> None:
        started = time.perf_counter()
        first: float | None = None
        tokens: int | None = None
        done = False
        with self.client.post(
            path,
            json=body,
            name=name,
            stream=True,
            catch_response=True,
            timeout=REQUEST_TIMEOUT_S,
        ) as resp:
            if not 200 <= resp.status_code < 300:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            try:
                for event in sse_events(resp.iter_lines()):
                    if event is None:
                        done = True
                        break
                    if "error" in event:  # the server reports mid-stream failures this way
                        resp.failure(f"SSE error: {json.dumps(event['error'])[:200]}")
                        return
                    if event.get("usage"):
                        tokens = int(event["usage"]["completion_tokens"])
                    if first is None and chunk_text(event, chat=chat):
                        first = time.perf_counter()
            except Exception as exc:  # broken connection, bad JSON: all count as failures
                resp.failure(f"stream broke: {exc!r}")
                return
            end = time.perf_counter()
            # locust timed only the headers of a streamed response; report the whole stream
            resp.request_meta["response_time"] = (end - started) * 1000
            if not done:
                resp.failure("stream ended without [DONE]")
                return
            if tokens is None:
                resp.failure("stream had no usage chunk")
                return
            resp.success()
        _totals["completion_tokens"] += tokens
        if first is not None:
            _ttft_ms.append((first - started) * 1000)
            self._metric("TTFT", name, _ttft_ms[-1])
            # decode rate after the first token: what a reader sees once text appears
            if tokens > 1 and end > first:
                _tok_s.append((tokens - 1) / (end - first))
                self._metric("TOKS", name, _tok_s[-1])

    # --- tasks ---------------------------------------------------------------------------

    def chat_stream(self) -> None:
        self._stream(
            CHAT_PATH,
            self._body(chat=True, stream=True, rag=False),
            "chat stream",
            chat=True,
        )

    def chat(self) -> None:
        self._plain(CHAT_PATH, self._body(chat=True, stream=False, rag=False), "chat")

    def completion_stream(self) -> None:
        self._stream(
            COMPLETION_PATH,
            self._body(chat=False, stream=True, rag=False),
            "completion stream",
            chat=False,
        )

    def completion(self) -> None:
        self._plain(COMPLETION_PATH, self._body(chat=False, stream=False, rag=False), "completion")

    def chat_stream_rag(self) -> None:
        self._stream(
            CHAT_PATH,
            self._body(chat=True, stream=True, rag=True),
            "chat stream rag",
            chat=True,
        )

    def chat_rag(self) -> None:
        self._plain(CHAT_PATH, self._body(chat=True, stream=False, rag=True), "chat rag")

    def list_adapters(self) -> None:
        with self.client.get("/adapters", name="admin list adapters", catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")

    def swap_spare_adapter(self) -> None:
        # A name of its own per call, so concurrent users never race each other into a 409.
        name = f"lt-spare-{os.getpid()}-{next(_spare_ids)}"
        with self.client.post(
            "/adapters",
            json={"name": name, "path": SPARE_PATH},
            name="admin register adapter",
            catch_response=True,
        ) as r:
            if r.status_code != 201:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return
        with self.client.delete(
            f"/adapters/{name}", name="admin unregister adapter", catch_response=True
        ) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")

    # Weights: inference dominates; chat streaming is what interactive apps mostly send.
    # RAG and the spare-adapter swap need something set up on the server, so they are left
    # out when the runner did not set that up (rather than failing every time).
    tasks: dict[Callable[..., None], int] = {  # type: ignore[assignment]
        chat_stream: 4,
        chat: 3,
        completion_stream: 2,
        completion: 2,
        list_adapters: 1,
        **({chat_stream_rag: 2, chat_rag: 1} if RAG_COLLECTION else {}),
        **({swap_spare_adapter: 1} if SPARE_PATH else {}),
    }
