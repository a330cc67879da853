"""Graceful shutdown: drain, cut what is left at the end of the grace, then stop.

On SIGTERM (or the first Ctrl-C) `swapserve serve` does not stop at once. It drains:

1. New requests get 503 `shutting_down` in the OpenAI error shape (with `Connection:
   close`), and `/ready` answers 503 `{"status": "draining"}` so a load balancer moves
   traffic away. `/health` and `/metrics` keep answering; the port stays open so callers
   get an answer rather than a refused connection.
2. Running training workers are told to stop (SIGTERM; they end `interrupted`).
3. Requests already running carry on, for most of `shutdown_grace_s` seconds.
4. Near the end of the grace (`cut_reserve_s` before it: a quarter of the grace, at most
   3 s, so the last chunks and the close fit inside it and the process exits within the
   grace), generations still running are cut: a streamed response ends
   with a final chunk whose `finish_reason` is `"abort"`, then `data: [DONE]`; a
   non-streamed one returns the text so far with `finish_reason: "abort"`. Never a torn
   connection.
5. Then the HTTP server stops and the lifespan shutdown closes the engine and stores.

A second signal during the drain cuts the running generations at once.

Nothing here knows torch or the engine: `Drain` is a counter, two events and a few
callbacks. The HTTP server (server/cli.py) starts it; server/serving/ watches `aborting`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import error_body

logger = logging.getLogger(__name__)

# Paths that keep answering during the drain and do not count as work in flight: probes
# (a balancer must see /ready turn 503) and metrics (an operator watches the drain).
PROBE_PATHS = frozenset({"/health", "/ready", "/metrics"})
# The end of the grace kept for sending the cut responses' last chunk and closing.
CUT_FLUSH_S = 3.0


class Flag:
    """A one-way flag that coroutines on any event loop may wait for.

    Not an asyncio.Event: that binds to the first loop that waits on it, and one app can
    be served by several loops over its life (test clients start one each)."""

    def __init__(self) -> None:
        self._set = False
        self._waiters: set[asyncio.Future[None]] = set()
        self._lock = threading.Lock()

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        with self._lock:
            self._set = True
            waiters = list(self._waiters)
            self._waiters.clear()
        for fut in waiters:
            fut.get_loop().call_soon_threadsafe(_resolve, fut)

    async def wait(self) -> None:
        if self._set:
            return
        fut = asyncio.get_running_loop().create_future()
        with self._lock:
            if self._set:
                return
            self._waiters.add(fut)
        try:
            await fut
        finally:
            with self._lock:
                self._waiters.discard(fut)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Drain:
    """In-flight request count and the shutdown state of one app."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.started_at: float | None = None
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # set when running generations must end now (the grace is over, or a 2nd signal)
        self.aborting = Flag()
        self._on_start: list[Callable[[], Awaitable[None]]] = []

    @property
    def draining(self) -> bool:
        return self.started_at is not None

    def grace_left_s(self) -> float:
        if self.started_at is None:
            return self.grace_s
        return max(0.0, self.grace_s - (time.monotonic() - self.started_at))

    @property
    def cut_reserve_s(self) -> float:
        """How long before the end of the grace running generations are cut."""
        return min(CUT_FLUSH_S, self.grace_s / 4)

    def on_start(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run `fn` when the drain begins, beside the wait (e.g. stop training workers)."""
        self._on_start.append(fn)

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight <= 0:
            self.in_flight = 0
            self._idle.set()

    def cut_now(self) -> None:
        """End running generations now (a second signal)."""
        if not self.aborting.is_set():
            logger.warning("cutting %d request(s) still running", self.in_flight)
            self.aborting.set()

    async def run(self) -> None:
        """Drain: refuse new work, wait for running requests (at most the grace), cut the
        rest, and wait for the on-start callbacks. Returns when the server may stop."""
        if self.started_at is None:
            self.started_at = time.monotonic()
        logger.warning(
            "shutting down: draining %d request(s) in flight, grace %.0f s",
            self.in_flight,
            self.grace_s,
        )
        hooks = [asyncio.ensure_future(fn()) for fn in self._on_start]
        idle = asyncio.ensure_future(self._idle.wait())
        cut = asyncio.ensure_future(self.aborting.wait())
        try:
            until_cut = self.grace_s - self.cut_reserve_s
            await asyncio.wait({idle, cut}, timeout=until_cut, return_when="FIRST_COMPLETED")
            if not self._idle.is_set():
                self.cut_now()
                await asyncio.wait({idle}, timeout=max(self.grace_left_s(), 0.5))
        finally:
            idle.cancel()
            cut.cancel()
        if not self._idle.is_set():
            logger.error("%d request(s) did not end after the cut", self.in_flight)
        if hooks:
            # the hooks were given the grace too (training workers stop at their next step)
            _, pending = await asyncio.wait(hooks, timeout=max(self.grace_left_s(), 0.5))
            for task in pending:
                task.cancel()
            for task in hooks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    logger.error("shutdown step failed: %r", task.exception())
        logger.info("drained in %.1f s", time.monotonic() - (self.started_at or 0))


class DrainMiddleware:
    """Counts requests in flight; during a drain answers new ones 503 `shutting_down`."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path", "") in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            await _send_503(send, self.drain.grace_left_s())
            return
        self.drain.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.leave()


async def _send_503(send: Send, grace_left_s: float) -> None:
    body = json.dumps(
        error_body(
            503,
            "the server is shutting down and takes no new requests; retry on another "
            "instance, or here once it has restarted",
            None,
            "shutting_down",
        )
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(max(1, math.ceil(grace_left_s))).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class DrainingServer(uvicorn.Server):
    """uvicorn's server, except that the first SIGTERM/SIGINT drains before stopping.

    On a signal uvicorn stops listening at once and cancels whatever still runs after its
    timeout: callers would see refused connections and torn streams. Here the first signal
    runs `Drain.run` and only then lets uvicorn stop. A second signal cuts the running
    requests at once; a third is uvicorn's own (force quit).
    """

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Future[None] | None = None
        self._signals = 0

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the main thread between two bytecodes of the event loop: hand the work
        # to the loop instead of touching asyncio objects here. The drained exit is a
        # normal one (status 0): the signal is not re-raised as uvicorn's own exit does.
        self._signals += 1
        loop = self._loop
        if loop is None or self.should_exit or self._signals > 2:
            super().handle_exit(sig, frame)
        elif self._signals == 1:
            loop.call_soon_threadsafe(self._start_drain)
        else:
            loop.call_soon_threadsafe(self.drain.cut_now)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self.drain.run())
        self._drain_task.add_done_callback(self._drained)

    def _drained(self, task: asyncio.Future[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("the drain failed: %r", task.exception())
        self.should_exit = True
