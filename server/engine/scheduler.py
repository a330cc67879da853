"""Continuous batching: requests join and leave the running batch at every step.

The main loop (`Scheduler._loop`) runs in one thread and owns the model: each turn it
  1. runs queued control calls (adapter loads and unloads happen here, between steps),
  2. drops rows whose client went away or whose deadline passed,
  3. admits waiting sequences into a prefill group (up to `max_num_seqs` rows in all),
  4. runs one chunk of that group's prefill, so a long prompt never stalls running streams
     for more than one chunk; a finished group joins the decode batch,
  5. runs ONE decode forward over every running row, each row with its own adapter,
  6. samples, detokenises, checks stop conditions and hands outputs back to their callers.

A newcomer need not wait for the decode step under way: on a runner that allows it
(``preempts_decode``), the step calls back between its layers (``submit`` tells it to,
for layers that run as one call on the CPU kernel), and a group whose whole prompt fits in
one chunk is admitted and prefilled there, its first tokens sent at once
(``_prefill_inside_step``). It joins the batch after the step's own sampling, since the
step is using the batch's cache rows and the running list.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from server.engine.base import (
    EngineShutdownError,
    GenerationOutput,
    GenerationRequest,
    Logprob,
    QueueFullError,
    RequestTimeoutError,
    TokenLogprobs,
)
from server.engine.grammar import RowGrammar
from server.engine.kv import KVBatch
from server.engine.runner import ModelRunner, PrefillGroup, adapter_row_name
from server.engine.sampling import RawLogprobs, RowSampler, sample_rows
from server.engine.static_kv import StaticKV

if TYPE_CHECKING:
    from server.engine.fast_runner import FastModelRunner

logger = logging.getLogger(__name__)

Emit = Callable[[GenerationOutput | BaseException], None]


@dataclass
class Sequence:
    """One choice of one request, from queue to finish."""

    request: GenerationRequest
    index: int
    emit: Emit
    sampler: RowSampler
    deadline: float
    generated: list[int] = field(default_factory=list)
    sent_chars: int = 0
    cancelled: bool = False
    finished: bool = False
    enqueued_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    # the prompt's own token logprobs (sampling.prompt_logprobs), sent with the first output
    prompt_logprobs: list[RawLogprobs] | None = None
    # context positions the adapter takes before the prompt (virtual tokens, KV prefix)
    reserved: int = 0

    @property
    def adapter_row(self) -> str:
        return adapter_row_name(self.request.adapter)

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)


@dataclass
class Prefilled:
    """A group whose prefill is done and whose first tokens are sent, before it joins the
    decode batch: ``done`` holds the rows that finished at their first token."""

    batch: KVBatch | StaticKV
    seqs: list[Sequence]
    done: set[int]


@dataclass
class SchedulerStats:
    waiting: int = 0
    running: int = 0
    prefilling: int = 0
    steps: int = 0
    tokens_generated: int = 0
    prompt_tokens: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0
    requests_timed_out: int = 0
    last_batch_size: int = 0
    peak_batch_size: int = 0


class Scheduler:
    def __init__(
        self,
        runner: ModelRunner | FastModelRunner,
        decode: Callable[[list[int]], str],
        stop_token_ids: list[int],
        *,
        max_model_len: int,
        max_num_seqs: int = 16,
        max_queue: int = 64,
        prefill_chunk_tokens: int = 512,
        token_bytes: Callable[[int], bytes] = lambda token: b"",
    ):
        self.runner = runner
        self.decode = decode
        self.token_bytes = token_bytes  # a token's own bytes, for log probabilities
        self.stop_token_ids = set(stop_token_ids)
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_queue = max_queue
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.stats = SchedulerStats()

        self._cv = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._prefill: tuple[PrefillGroup, list[Sequence]] | None = None
        # prefilled inside a decode step; joins the batch once that step has sampled
        self._prefilled: Prefilled | None = None
        self._batch: KVBatch | StaticKV | None = None
        self._running: list[Sequence] = []
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- called from other threads -------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="swapserve-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, seqs: list[Sequence]) -> None:
        with self._cv:
            if self._stopping:
                raise EngineShutdownError("the server is shutting down")
            if len(self._waiting) + len(seqs) > self.max_queue + self._free_rows():
                raise QueueFullError(
                    f"the request queue is full ({len(self._waiting)} waiting); retry shortly",
                    retry_after_s=1.0,
                )
            self._waiting.extend(seqs)
            self._cv.notify_all()
        if self.runner.preempts_decode:  # a step under way may prefill them between layers
            cast("FastModelRunner", self.runner).interrupt_decode()

    def wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run fn in the scheduler thread between two steps (model changes go here)."""
        future: Future = Future()
        with self._cv:
            if self._stopping:
                future.set_exception(EngineShutdownError("the server is shutting down"))
                return future
            self._calls.append((fn, future))
            self._cv.notify_all()
        return future

    # --- the loop --------------------------------------------------------------------------

    def _free_rows(self) -> int:
        prefilling = len(self._prefill[1]) if self._prefill else 0
        if self._prefilled is not None:
            prefilling += len(self._prefilled.seqs)
        return max(0, self.max_num_seqs - len(self._running) - prefilling)

    def _has_work(self) -> bool:
        return bool(self._calls or self._waiting or self._running or self._prefill)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._has_work():
                    self._cv.wait(timeout=1.0)
                if self._stopping:
                    break
                calls = list(self._calls)
                self._calls.clear()
            for fn, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as exc:  # handed to the caller, not raised here
                        future.set_exception(exc)
            try:
                self._reap()
                self._admit()
                if self._prefill is not None:
                    self._step_prefill()
                if self._running:
                    self._step_decode()
            except Exception as exc:  # a failed forward fails its rows, not the server
                logger.exception("scheduler step failed")
                self._fail_all(exc)
            self._update_stats()
        self._fail_all(EngineShutdownError("the server is shutting down"))

    def _update_stats(self) -> None:
        self.stats.waiting = len(self._waiting)
        self.stats.running = len(self._running)
        self.stats.prefilling = len(self._prefill[1]) if self._prefill else 0

    def _reap_waiting(self, now: float) -> None:
        with self._cv:
            for seq in list(self._waiting):
                if seq.cancelled or now > seq.deadline:
                    self._waiting.remove(seq)
                    self._end_early(seq, now)

    def _reap(self) -> None:
        now = time.monotonic()
        self._reap_waiting(now)
        if self._prefill is not None and all(
            s.cancelled or now > s.deadline for s in self._prefill[1]
        ):
            for seq in self._prefill[1]:
                self._end_early(seq, now)
            self._prefill = None
        gone = [i for i, s in enumerate(self._running) if s.cancelled or now > s.deadline]
        if gone:
            for i in gone:
                self._end_early(self._running[i], now)
            self._drop_rows(set(gone))

    def _end_early(self, seq: Sequence, now: float) -> None:
        seq.finished = True
        if seq.cancelled:
            self.stats.requests_cancelled += 1
            return
        self.stats.requests_timed_out += 1
        seq.emit(RequestTimeoutError("the request ran past its timeout"))

    def _drop_rows(self, rows: set[int]) -> None:
        keep = [i for i in range(len(self._running)) if i not in rows]
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._batch = None
        elif self._batch is not None:
            self._batch.select(keep)

    def _admit(self) -> None:
        if self._prefill is not None:
            return
        with self._cv:
            free = self._free_rows()
            if not free or not self._waiting:
                return
            seqs = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
        group = self.runner.new_group(
            [s.request.prompt_token_ids for s in seqs],
            [s.adapter_row for s in seqs],
            [s.request.sampling.prompt_logprobs for s in seqs],
        )
        for seq in seqs:
            seq.reserved = self.runner.adapters.context_tokens(seq.adapter_row)
        self._prefill = (group, seqs)

    def _step_prefill(self) -> None:
        prefilled = self._prefill_chunk()
        if prefilled is not None:
            self._join(prefilled)

    def _prefill_chunk(self) -> Prefilled | None:
        """One chunk of the group in progress; when that finishes it, its first tokens."""
        assert self._prefill is not None
        group, seqs = self._prefill
        self.runner.prefill_chunk(group, self.prefill_chunk_tokens)
        if not group.finished:
            return None
        self._prefill = None
        batch, logits = self.runner.finish_prefill(group)
        for i, seq in enumerate(seqs):
            if group.prompt_logprobs[i] is not None:
                first: RawLogprobs = (seq.request.prompt_token_ids[0], None, [])
                # a row's input starts with its adapter's virtual-token placeholders
                virtual = len(group.prompts[i]) - len(seq.request.prompt_token_ids)
                seq.prompt_logprobs = [first, *group.prompt_lps[i][virtual:]]
        self.stats.prompt_tokens += sum(group.lengths)
        tokens = sample_rows(logits, [s.sampler for s in seqs])
        done = {i for i, (s, t) in enumerate(zip(seqs, tokens, strict=True)) if self._advance(s, t)}
        return Prefilled(batch, seqs, done)

    def _join(self, prefilled: Prefilled) -> None:
        """A prefilled group joins the decode batch; rows done at their first token leave."""
        if self._batch is None:
            self._batch = prefilled.batch
        else:
            self._batch.merge(prefilled.batch)
        offset = len(self._running)
        self._running.extend(prefilled.seqs)
        if prefilled.done:
            self._drop_rows({offset + i for i in prefilled.done})

    def _prefill_inside_step(self) -> bool:
        """Called between two layers of a decode step: prefill newcomers now, when their
        whole group fits in one chunk, rather than after the step. True when it ran a
        forward (the runner then plans its own rows again).

        Control calls never run here (they change the model); the step's batch and
        running list are not touched (the group waits in ``_prefilled`` to join). One
        group per step: it bounds what a step can be stretched by to one chunk."""
        if self._prefilled is not None:
            return False
        if self._prefill is None:
            if not self._waiting or not self._free_rows():  # a look without the lock
                return False
            self._reap_waiting(time.monotonic())
            self._admit()
            if self._prefill is None:
                return False
        group, _ = self._prefill
        if group.chunk_end(self.prefill_chunk_tokens) < group.total:
            return False  # a longer prompt goes on chunk by chunk between steps
        self._prefilled = self._prefill_chunk()
        return True

    def _step_decode(self) -> None:
        assert self._batch is not None
        seqs = self._running
        tokens_in = [s.generated[-1] for s in seqs]
        adapters = [s.adapter_row for s in seqs]
        if self.runner.preempts_decode:  # the fast runner, over a StaticKV: takes the callback
            fast = cast("FastModelRunner", self.runner)
            logits = fast.decode(
                cast(StaticKV, self._batch),
                tokens_in,
                adapters,
                between_layers=self._prefill_inside_step,
            )
        else:
            logits = self.runner.decode(self._batch, tokens_in, adapters)
        self.stats.steps += 1
        self.stats.last_batch_size = len(seqs)
        self.stats.peak_batch_size = max(self.stats.peak_batch_size, len(seqs))
        tokens = sample_rows(logits, [s.sampler for s in seqs])
        done = {i for i, (s, t) in enumerate(zip(seqs, tokens, strict=True)) if self._advance(s, t)}
        if done:
            self._drop_rows(done)
        if self._prefilled is not None:
            prefilled, self._prefilled = self._prefilled, None
            self._join(prefilled)

    # --- one token for one sequence ----------------------------------------------------------

    def _advance(self, seq: Sequence, token: int) -> bool:
        """Record a token, emit new text; True when the sequence is finished."""
        if seq.cancelled:
            seq.finished = True
            self.stats.requests_cancelled += 1
            return True
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        params = seq.request.sampling
        if params.max_tokens == 0:  # the prompt's logprobs only (completions' echo)
            self._emit(seq, GenerationOutput(index=seq.index, text="", token_ids=[]), "length")
            return True
        self.stats.tokens_generated += 1
        finish: str | None = None
        if token in self.stop_token_ids and not params.ignore_eos:
            finish = "stop"
            new_ids: list[int] = []
        else:
            seq.generated.append(token)
            new_ids = [token]
            grammar = seq.sampler.grammar
            if grammar is not None and grammar.finished:
                finish = "stop"  # the grammar is complete: nothing more may follow
        text = self.decode(seq.generated)
        end = len(text)
        if finish is None and params.stop:
            hit = _find_stop(text, params.stop, seq.sent_chars)
            if hit is not None:
                end, finish = hit, "stop"
        if finish is None and (
            len(seq.generated) >= params.max_tokens
            or seq.prompt_tokens + seq.reserved + len(seq.generated) >= self.max_model_len
        ):
            finish = "length"
        if finish is None:
            # hold back a partial UTF-8 character and anything that may begin a stop string
            end -= _holdback(text, params.stop)
        delta = text[seq.sent_chars : max(end, seq.sent_chars)]
        seq.sent_chars = max(end, seq.sent_chars)
        if finish is None and not delta and not new_ids:
            return False
        out = GenerationOutput(index=seq.index, text=delta, token_ids=new_ids)
        raw = seq.sampler.last_logprobs
        if new_ids and raw is not None:
            out.logprobs = [self._logprobs(raw)]
        return self._emit(seq, out, finish)

    def _emit(self, seq: Sequence, out: GenerationOutput, finish: str | None) -> bool:
        out.finish_reason = finish
        out.prompt_tokens = seq.prompt_tokens
        out.completion_tokens = len(seq.generated)
        if seq.prompt_logprobs is not None:  # with the choice's first output only
            out.prompt_logprobs = [self._logprobs(raw) for raw in seq.prompt_logprobs]
            seq.prompt_logprobs = None
        seq.emit(out)
        if finish is not None:
            seq.finished = True
            self.stats.requests_finished += 1
            return True
        return False

    def _logprobs(self, raw: RawLogprobs) -> TokenLogprobs:
        token, logprob, top = raw
        return TokenLogprobs(
            chosen=Logprob(token, logprob, self.token_bytes(token)),
            top=[Logprob(t, lp, self.token_bytes(t)) for t, lp in top],
        )

    def _fail_all(self, exc: BaseException) -> None:
        with self._cv:
            seqs = list(self._waiting) + list(self._running)
            if self._prefill is not None:
                seqs += self._prefill[1]
            if self._prefilled is not None:
                seqs += self._prefilled.seqs
            self._waiting.clear()
            calls = list(self._calls)
            self._calls.clear()
        self._running = []
        self._batch = None
        self._prefill = None
        self._prefilled = None
        for seq in seqs:
            if not seq.finished:
                seq.finished = True
                seq.emit(exc)
        for _, future in calls:
            if not future.done():
                future.set_exception(exc)


def _find_stop(text: str, stops: list[str], start: int) -> int | None:
    """Index where the earliest stop string begins, searching from just before `start`."""
    best: int | None = None
    for stop in stops:
        if not stop:
            continue
        pos = text.find(stop, max(0, start - len(stop)))
        if pos != -1 and (best is None or pos < best):
            best = pos
    return best


def _holdback(text: str, stops: list[str]) -> int:
    hold = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold


def new_sequences(
    request: GenerationRequest,
    emit: Emit,
    *,
    default_timeout_s: float,
    grammar: Callable[[], RowGrammar] | None = None,
) -> list[Sequence]:
    """One sequence per choice; `grammar` makes each choice's own grammar state."""
    deadline = time.monotonic() + (request.timeout_s or default_timeout_s)
    return [
        Sequence(
            request=request,
            index=i,
            emit=emit,
            sampler=RowSampler.create(
                request.sampling, i, grammar=grammar() if grammar is not None else None
            ),
            deadline=deadline,
        )
        for i in range(request.sampling.n)
    ]
