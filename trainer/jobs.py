"""JobManager: training jobs in their own processes, so serving stays up while they run.

The HTTP layer calls ``submit`` / ``get`` / ``list`` / ``cancel`` / ``events``; the server
calls ``recover()`` once at start and passes ``on_success`` to register finished adapters
through its own validation. Records are JSON files, so job state survives restarts.

Threading: a daemon monitor thread starts queued jobs (at most ``max_running`` at a time)
and reaps finished ones. ``on_success(record)`` runs on that thread; a server running an
asyncio loop should hand the work over with ``asyncio.run_coroutine_threadsafe``.
"""

from __future__ import annotations

import builtins
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.config import ConfigError, JobConfig
from trainer.data import load_jsonl
from trainer.objectives import build_config, get_objective, objective_names
from trainer.paths import full_model_dir
from trainer.records import (
    CANCEL_FLAG,
    RECORD,
    STATES,
    TERMINAL,
    WORKER_LOG,
    append_event,
    read_events,
    read_record,
    write_record,
)

logger = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
KINDS = tuple(objective_names())
# The repository root, so `python -m trainer.worker` imports this very package.
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent

OnSuccess = Callable[[dict[str, Any]], None]


class JobError(Exception):
    """Base class of job-management errors (the HTTP layer maps them to 4xx)."""


class JobNotFound(JobError, KeyError):
    """No job with that id (HTTP 404)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "job not found"


class JobConflict(JobError):
    """The name is taken by another job or an existing adapter folder (HTTP 409)."""


class JobStateError(JobError):
    """The job is in a state that does not allow the operation (HTTP 409)."""


def config_class(kind: str) -> type[JobConfig]:
    return get_objective(kind).config_class


__all__ = ["JobManager", "build_config", "config_class"]


class JobManager:
    def __init__(
        self,
        root_dir: str | Path,
        *,
        adapters_dir: str | Path | None = None,
        max_running: int = 1,
        on_success: OnSuccess | None = None,
        on_finished: OnSuccess | None = None,
        python: str = sys.executable,
        poll_interval_s: float = 0.5,
        cancel_grace_s: float = 120.0,
    ):
        """``root_dir`` holds one folder per job; adapters go to ``adapters_dir/<name>``
        (default ``root_dir/../trained``, matching the CLI's ``<data_dir>/trained``).
        ``on_finished(record)`` runs for every job that ends, whatever its state, after
        ``on_success`` (the method comparison waits for all of its jobs through it)."""
        if max_running < 1:
            raise ValueError("max_running must be >= 1")
        self.root = Path(root_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.adapters_dir = Path(adapters_dir) if adapters_dir else self.root.parent / "trained"
        self.max_running = max_running
        self.on_success = on_success
        self.on_finished = on_finished
        self.python = python
        self.poll_interval_s = poll_interval_s
        self.cancel_grace_s = cancel_grace_s
        self._lock = threading.RLock()
        self._procs: dict[str, subprocess.Popen] = {}
        self._finishing: set[str] = set()  # exited, being finalised (on_success running)
        self._queue: list[str] = []
        self._cancel_requested: dict[str, float] = {}
        self._stop = threading.Event()
        self._wake_event = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ public API

    def submit(
        self,
        kind: str,
        config: JobConfig | dict[str, Any] | None,
        data_path: str | Path,
        name: str,
        *,
        meta: dict[str, Any] | None = None,
    ) -> str:
        """Validate, copy the data into the job folder, queue; return the job id.

        ``meta`` is stored as ``record["meta"]`` for the caller (the server keeps its
        register/replace choices there, so ``on_success`` still knows them after a restart).

        Raises ConfigError, DataError (structure: JSON, fields, roles; the token-length
        check needs the tokenizer and runs in the job), JobConflict.
        """
        cfg = build_config(kind, config)
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ConfigError(
                "name",
                f"{name!r} is not a safe adapter name: use 1-64 letters, digits, '.', '_' "
                "or '-', starting with a letter or digit",
            )
        task = get_objective(kind).task
        data = load_jsonl(data_path, task)
        eval_data = load_jsonl(cfg.eval_file, task) if cfg.eval_file else None
        output_dir = self.adapters_dir / name
        with self._lock:
            if output_dir.exists():
                raise JobConflict(f"an adapter folder named {name!r} already exists: {output_dir}")
            if cfg.method == "full" and full_model_dir(output_dir).exists():
                raise JobConflict(
                    f"a model folder named {name!r} already exists: {full_model_dir(output_dir)}"
                )
            for rec in self.list():
                if rec["name"] == name and rec["state"] in ("queued", "running"):
                    raise JobConflict(f"job {rec['id']} is already training {name!r}")
            job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]
            job_dir = self.root / job_id
            job_dir.mkdir(parents=True)
            try:
                # A private copy: the caller's file (often an upload in a temp dir) may vanish.
                shutil.copyfile(data.path, job_dir / "data.jsonl")
                cfg_dict = cfg.to_dict()
                if eval_data is not None:
                    shutil.copyfile(eval_data.path, job_dir / "eval.jsonl")
                    cfg_dict["eval_file"] = str(job_dir / "eval.jsonl")
                record = {
                    "id": job_id,
                    "name": name,
                    "kind": kind,
                    "state": "queued",
                    "step": 0,
                    "total_steps": None,
                    "progress": 0.0,
                    "loss": None,
                    "loss_history": [],
                    "eval_loss": None,
                    "eval_loss_history": [],
                    "eta_s": None,
                    "error": None,
                    "output_dir": str(output_dir),
                    "data_path": str(job_dir / "data.jsonl"),
                    "data_sha256": data.sha256,
                    "data_counts": data.counts(),
                    "config": cfg_dict,
                    "created_at": time.time(),
                    "started_at": None,
                    "finished_at": None,
                    "pid": None,
                    "notified": False,
                    "meta": dict(meta or {}),
                }
                write_record(job_dir, record)
                append_event(job_dir, "state", state="queued")
            except BaseException:
                # a full disk mid-copy: no half-made job folder is left to list or resume
                shutil.rmtree(job_dir, ignore_errors=True)
                raise
            self._queue.append(job_id)
        logger.info("queued %s job %s (%s)", kind, job_id, name)
        self._ensure_monitor()
        self._wake()
        return job_id

    def get(self, job_id: str) -> dict[str, Any]:
        job_dir = self._job_dir(job_id)
        try:
            return read_record(job_dir)
        except FileNotFoundError:
            raise JobNotFound(f"no job {job_id!r}") from None

    def list(self) -> list[dict[str, Any]]:
        """All job records, oldest first."""
        out = []
        for child in self.root.iterdir():
            if (child / RECORD).is_file():
                try:
                    record = read_record(child)
                except (OSError, ValueError):
                    logger.warning("unreadable job record in %s", child)
                    continue
                if _record_problem(record, child.name) is None:
                    out.append(record)
                else:
                    logger.warning("job record in %s is not a usable job record", child)
        return sorted(out, key=lambda r: (r.get("created_at") or 0, r["id"]))

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Queued: cancelled at once. Running: stops at the next step (the record turns
        'cancelled' when the worker has exited). Cancelled again: no-op. Finished: error."""
        with self._lock:
            record = self.get(job_id)
            job_dir = self._job_dir(job_id)
            state = record["state"]
            if state == "cancelled":
                return record
            if state in TERMINAL:
                raise JobStateError(f"job {job_id} already {state}; nothing to cancel")
            if state == "queued" and job_id not in self._procs:
                if job_id in self._queue:
                    self._queue.remove(job_id)
                record.update(state="cancelled", finished_at=time.time())
                write_record(job_dir, record)
                append_event(job_dir, "state", state="cancelled")
                return record
            (job_dir / CANCEL_FLAG).touch()
            self._cancel_requested.setdefault(job_id, time.monotonic())
            append_event(job_dir, "cancel_requested")
        self._wake()
        return self.get(job_id)

    def events(self, job_id: str, since: int = 0) -> list[dict[str, Any]]:
        """Events from sequence number ``since`` on; pass the last seq + 1 to follow."""
        self.get(job_id)
        return read_events(self._job_dir(job_id), since)

    def recover(self) -> list[str]:
        """At start: jobs left 'running' by a dead server become 'interrupted'; queued
        jobs queue again; succeeded jobs never handed to on_success are handed over now.
        Returns the ids marked interrupted."""
        interrupted = []
        to_notify = []
        with self._lock:
            self._quarantine_unreadable()
            for record in self.list():
                job_id, state = record["id"], record["state"]
                job_dir = self._job_dir(job_id)
                if job_id in self._procs:
                    continue
                if state == "running":
                    pid = record.get("pid")
                    if pid and _is_our_worker(pid, job_dir):
                        # An orphan from the previous server: nobody supervises it now.
                        try:
                            os.kill(pid, signal.SIGTERM)
                        except ProcessLookupError:
                            pass
                    record.update(
                        state="interrupted",
                        finished_at=time.time(),
                        error="the server stopped while this job was running",
                    )
                    write_record(job_dir, record)
                    append_event(job_dir, "state", state="interrupted")
                    self._clean_partial_output(record)
                    interrupted.append(job_id)
                elif state == "queued" and job_id not in self._queue:
                    self._queue.append(job_id)
                elif state == "succeeded" and not record.get("notified"):
                    to_notify.append(record)
        for record in to_notify:
            self._notify(record)
        if self._queue:
            self._ensure_monitor()
            self._wake()
        if interrupted:
            logger.warning("marked %d job(s) interrupted: %s", len(interrupted), interrupted)
        return interrupted

    def _quarantine_unreadable(self) -> builtins.list[str]:
        """Job folders whose record cannot be read (torn, edited, not a job record) move to
        ``<root>/.quarantine/``: one bad file must not break listing the others."""
        moved = []
        for child in sorted(self.root.iterdir()):
            if not child.is_dir() or child.name.startswith(".") or not (child / RECORD).exists():
                continue
            try:
                record = read_record(child)
                problem = _record_problem(record, child.name)
            except (OSError, ValueError) as exc:
                problem = f"unreadable ({type(exc).__name__}: {exc})"
            if problem is None:
                continue
            dest = self.root / ".quarantine" / f"{child.name}-{int(time.time())}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(child, dest)
            logger.error("job record %s %s; quarantined to %s", child.name, problem, dest)
            moved.append(child.name)
        return moved

    def wait(self, job_id: str, timeout_s: float | None = None) -> dict[str, Any]:
        """Block until the job is terminal and reaped (tests and the CLI use this)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            record = self.get(job_id)
            with self._lock:
                active = job_id in self._procs or job_id in self._queue or job_id in self._finishing
            if record["state"] in TERMINAL and not active:
                return record
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {record['state']} after {timeout_s} s")
            time.sleep(0.2)

    def close(self, *, stop_running: bool = True, timeout_s: float = 30.0) -> None:
        """Stop the monitor; running workers are sent SIGTERM (they end 'interrupted').

        ``timeout_s`` bounds the whole wait, not each worker's; a worker still running then
        is killed, and recorded 'interrupted' like one that stopped on the signal."""
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            procs = dict(self._procs)
        if stop_running:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.terminate()  # all at once: they stop in parallel
        deadline = time.monotonic() + timeout_s
        for job_id, proc in procs.items():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("job %s did not stop on SIGTERM in time: killing it", job_id)
                proc.kill()
                proc.wait()
            self._finalize(job_id, proc, stopped=stop_running)

    # ------------------------------------------------------------------ internals

    def _job_dir(self, job_id: str) -> Path:
        # ids are generated here; refuse anything that could walk out of root
        if not isinstance(job_id, str) or not re.fullmatch(r"[A-Za-z0-9-]{1,64}", job_id):
            raise JobNotFound(f"no job {job_id!r}")
        return self.root / job_id

    def _ensure_monitor(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(
                    target=self._monitor, name="swapserve-jobs", daemon=True
                )
                self._thread.start()

    def _wake(self) -> None:
        self._wake_event.set()

    def _monitor(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the monitor must outlive any one bad job
                logger.exception("job monitor tick failed")
            self._wake_event.wait(self.poll_interval_s)
            self._wake_event.clear()

    def tick(self) -> None:
        """Reap finished workers, enforce cancel deadlines, start queued jobs."""
        with self._lock:
            done = [(i, p) for i, p in self._procs.items() if p.poll() is not None]
            for job_id, _ in done:
                del self._procs[job_id]
                self._finishing.add(job_id)
        # Finalising runs on_success, which may be slow (the server loads the adapter):
        # keep it outside the lock so submit/cancel stay responsive.
        for job_id, proc in done:
            try:
                self._finalize(job_id, proc)
            finally:
                with self._lock:
                    self._finishing.discard(job_id)
        with self._lock:
            for job_id, proc in self._procs.items():
                asked = self._cancel_requested.get(job_id)
                if asked is not None and time.monotonic() - asked > self.cancel_grace_s:
                    logger.warning(
                        "job %s ignored cancel for %.0f s: killing", job_id, self.cancel_grace_s
                    )
                    proc.kill()
            while self._queue and len(self._procs) < self.max_running:
                self._launch(self._queue.pop(0))

    def _launch(self, job_id: str) -> None:
        job_dir = self._job_dir(job_id)
        record = read_record(job_dir)
        if record["state"] != "queued":
            return
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_PACKAGE_ROOT), env.get("PYTHONPATH")) if p
        )
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        log = open(job_dir / WORKER_LOG, "ab")
        try:
            proc = subprocess.Popen(
                [self.python, "-m", "trainer.worker", str(job_dir)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=str(job_dir),
            )
        finally:
            log.close()
        # Written before the worker's first write: recover() needs the pid even if the
        # worker dies during its imports.
        record.update(state="running", pid=proc.pid, started_at=time.time())
        write_record(job_dir, record)
        append_event(job_dir, "state", state="started", pid=proc.pid)
        self._procs[job_id] = proc
        logger.info("started job %s (pid %d)", job_id, proc.pid)

    def _finalize(self, job_id: str, proc: subprocess.Popen, *, stopped: bool = False) -> None:
        with self._lock:
            self._procs.pop(job_id, None)
        cancel_asked = self._cancel_requested.pop(job_id, None) is not None
        job_dir = self._job_dir(job_id)
        (job_dir / CANCEL_FLAG).unlink(missing_ok=True)
        record = read_record(job_dir)
        if record["state"] not in TERMINAL:
            # The worker died without writing its end: killed, crashed, out of memory.
            if cancel_asked:
                record.update(state="cancelled", error=None)
            elif stopped:  # we stopped it (shutdown) before it could write its own end
                record.update(
                    state="interrupted", error="the server stopped while this job was running"
                )
            else:
                record.update(
                    state="failed",
                    error_type="internal",
                    error=f"worker exited with code {proc.returncode}: {_log_tail(job_dir)}",
                )
            record["finished_at"] = time.time()
            write_record(job_dir, record)
            append_event(job_dir, "state", state=record["state"], error=record.get("error"))
        if record["state"] != "succeeded":
            self._clean_partial_output(record)
        logger.info("job %s finished: %s", job_id, record["state"])
        if record["state"] == "succeeded":
            self._notify(record)
        if self.on_finished is not None:
            try:
                self.on_finished(read_record(job_dir))
            except Exception:  # a watcher's failure must not break the monitor
                logger.exception("on_finished failed for job %s", job_id)

    def _notify(self, record: dict[str, Any]) -> None:
        job_dir = self._job_dir(record["id"])
        error = None
        if self.on_success is not None:
            try:
                self.on_success(record)
            except Exception as exc:  # registration failing must not lose the job record
                logger.exception("on_success failed for job %s", record["id"])
                error = f"{type(exc).__name__}: {exc}"
        record = read_record(job_dir)
        record.update(notified=True, registration_error=error)
        write_record(job_dir, record)
        append_event(job_dir, "registered" if error is None else "registration_failed", error=error)

    def _clean_partial_output(self, record: dict[str, Any]) -> None:
        """A killed worker cannot clean up its temp folders; remove them (never the
        finished folders, which only exist after the final rename)."""
        out = Path(record["output_dir"])
        for folder in (out, full_model_dir(out)):
            if not folder.parent.is_dir():
                continue
            for pattern in (f".{folder.name}.tmp-*", f".{folder.name}.scratch-*"):
                for leftover in folder.parent.glob(pattern):
                    shutil.rmtree(leftover, ignore_errors=True)


def _record_problem(record: Any, job_id: str) -> str | None:
    """What makes ``record`` unusable as the record of job ``job_id``, or None."""
    if not isinstance(record, dict):
        return "is not a JSON object"
    if record.get("id") != job_id:
        return f"has id {record.get('id')!r}, not its folder's name"
    if record.get("state") not in STATES:
        return f"has an unknown state {record.get('state')!r}"
    for key in ("name", "kind", "output_dir"):
        if not isinstance(record.get(key), str):
            return f"lacks {key!r}"
    return None


def _is_our_worker(pid: int, job_dir: Path) -> bool:
    """True when ``pid`` is alive and is a trainer worker for ``job_dir`` (pids get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    args = [a.decode(errors="replace") for a in cmdline]
    return "trainer.worker" in args and str(job_dir) in args


def _log_tail(job_dir: Path, lines: int = 5) -> str:
    try:
        text = (job_dir / WORKER_LOG).read_text(errors="replace")
    except OSError:
        return "no worker log"
    return " | ".join(text.strip().splitlines()[-lines:])
