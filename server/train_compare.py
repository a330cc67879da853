"""POST /train/compare: every training method on the same data and budget, as jobs of this
server, then serving throughput of each registered result, one table and one HTML report.

The trainer owns what a comparison is (``trainer.compare``: the per-method configs, the
table's rows, the report); this service owns its life on the server: every method's config
is checked before the first job is queued (a refused method queues nothing), the jobs run
through the server's JobManager one at a time (each in its own process, so its peak memory
is its own) and register like any job, and when the last one has ended, each registered
adapter (and the base) is measured with 8 concurrent streams through the serving path the
clients use. Records are JSON files under ``<data_dir>/train-compare/``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer import compare as table
from trainer.atomic import write_json_atomic
from trainer.config import ConfigError
from trainer.jobs import JobConflict, JobNotFound
from trainer.records import TERMINAL

if TYPE_CHECKING:
    from server.training import TrainingService

logger = logging.getLogger(__name__)

# (model name) -> {"tok_s", "tokens", "wall_s", "error"}
Measure = Callable[[str], Awaitable[dict[str, Any]]]


class CompareService:
    def __init__(self, training: TrainingService, root: Path):
        self.training = training
        self.root = root
        self.measure: Measure | None = None  # set once the server can serve
        self.base_model_name = training.served_model_name
        self._tasks: dict[str, asyncio.Future[Any]] = {}

    # --- records --------------------------------------------------------------------------

    def _path(self, cmp_id: str) -> Path:
        if not cmp_id.replace("-", "").isalnum() or len(cmp_id) > 64:
            raise JobNotFound(f"no comparison {cmp_id!r}")
        return self.root / f"{cmp_id}.json"

    def _save(self, record: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self._path(record["id"]), record)

    def load(self, cmp_id: str) -> dict[str, Any]:
        path = self._path(cmp_id)
        if not path.is_file():
            raise JobNotFound(f"no comparison {cmp_id!r}")
        return json.loads(path.read_text())

    def records(self) -> list[dict[str, Any]]:
        if not self.root.is_dir():
            return []
        out = []
        for path in sorted(self.root.glob("*.json")):
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                logger.warning("unreadable comparison record %s", path)
        return sorted(out, key=lambda r: r.get("created_at") or 0)

    # --- submit ---------------------------------------------------------------------------

    def submit(
        self,
        *,
        name: str,
        methods: list[str] | None,
        objective: str,
        config: dict[str, Any] | None,
        method_config: dict[str, dict[str, Any]] | None,
        data_path: Path,
        data_label: str,
        eval_path: Path,
        eval_label: str,
        register: bool = True,
        replace: bool = False,
    ) -> dict[str, Any]:
        """Check every method's job, then queue them all; blocking (call from a thread)."""
        from trainer.data import dataset_hash
        from trainer.objectives import get_objective

        try:
            get_objective(objective)
        except ConfigError as exc:
            raise ConfigError("objective", str(exc).split(": ", 1)[-1]) from None
        chosen = table.parse_methods(methods)
        shared = dict(config or {})
        if "method" in shared:
            raise ConfigError("method", "the methods are given by `methods`, not the config")
        per_method = dict(method_config or {})
        unknown = sorted(set(per_method) - set(chosen))
        if unknown:
            raise ConfigError("method_config", f"{', '.join(unknown)} not among the methods")
        names = {m: table.job_name(name, m) for m in chosen}
        # everything is refused here, before the first job is queued
        fields = {}
        for m in chosen:
            try:
                fields[m] = self.training.job_config(
                    objective, {**shared, **per_method.get(m, {}), "method": m}
                )
            except ConfigError as exc:
                message = str(exc).split(": ", 1)[-1]
                raise type(exc)(exc.field, f"method {m}: {message}") from None
            if register:
                self.training.registry.check_new_name(names[m], replace=replace)
        self.training.check_data(objective, data_path, data_label, eval_path, eval_label)
        cmp_id = time.strftime("cmp-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        jobs: dict[str, str] = {}
        try:
            for m in chosen:
                record = self.training.submit(
                    objective,
                    names[m],
                    fields[m],
                    data_path,
                    data_label=data_label,
                    eval_path=eval_path,
                    eval_label=eval_label,
                    register=register,
                    replace=replace,
                    meta={"compare": cmp_id},
                )
                jobs[m] = record["id"]
        except (ConfigError, JobConflict):
            for job_id in jobs.values():  # nothing half-queued stays behind
                self.training.manager.cancel(job_id)
            raise
        record = {
            "id": cmp_id,
            "object": "train.compare",
            "name": name,
            "state": "running",
            "objective": objective,
            "methods": chosen,
            "names": names,
            "jobs": jobs,
            "budget": {k: v for k, v in shared.items() if k not in table.NOT_SHARED},
            "data_sha256": dataset_hash(data_path),
            "serving": {},
            "created_at": time.time(),
            "finished_at": None,
        }
        self._save(record)
        logger.info("comparison %s: %d %s jobs queued (%s)", cmp_id, len(jobs), objective, chosen)
        return self.view(record)

    # --- views ----------------------------------------------------------------------------

    def _jobs(self, record: dict[str, Any]) -> dict[str, dict[str, Any]]:
        out = {}
        for m, job_id in record["jobs"].items():
            try:
                out[m] = self.training.view(self.training.manager.get(job_id))
            except JobNotFound:
                out[m] = {"state": "failed", "error": f"job {job_id} is gone"}
        return out

    def view(self, record: dict[str, Any]) -> dict[str, Any]:
        jobs = self._jobs(record)
        rows = table.rows(record["methods"], record["names"], jobs, record.get("serving") or {})
        return {
            **record,
            "job_states": {m: j.get("state") for m, j in jobs.items()},
            "rows": rows,
            "markdown": table.markdown(rows),
        }

    def get(self, cmp_id: str) -> dict[str, Any]:
        record = self.load(cmp_id)
        self._maybe_finish(record)
        return self.view(record)

    def report(self, cmp_id: str) -> str:
        return table.html_report(self.get(cmp_id))

    def cancel(self, cmp_id: str) -> dict[str, Any]:
        record = self.load(cmp_id)
        for job_id in record["jobs"].values():
            job = self.training.manager.get(job_id)
            if job["state"] not in TERMINAL:
                self.training.manager.cancel(job_id)
        return self.view(record)

    # --- the end: serving throughput ------------------------------------------------------

    def job_finished(self, job: dict[str, Any]) -> None:
        """JobManager's on_finished (monitor thread): the last job of a comparison starts
        its serving measurements on the event loop."""
        cmp_id = (job.get("meta") or {}).get("compare")
        if not cmp_id:
            return
        try:
            record = self.load(cmp_id)
        except (JobNotFound, OSError, ValueError):
            return
        loop = self.training.loop
        if not loop.is_closed():
            loop.call_soon_threadsafe(self._maybe_finish, record)

    def _maybe_finish(self, record: dict[str, Any]) -> None:
        """On the event loop: once every job has ended (and the successes are registered),
        measure serving once; a record left running by a restart is finished here too."""
        if record["state"] == "done" or record["id"] in self._tasks:
            return
        jobs = self._jobs(record)
        settled = all(
            j.get("state") in TERMINAL and (j.get("state") != "succeeded" or j.get("notified"))
            for j in jobs.values()
        )
        if not settled:
            return
        self._tasks[record["id"]] = asyncio.ensure_future(self._finish(record["id"], jobs))

    async def _finish(self, cmp_id: str, jobs: dict[str, dict[str, Any]]) -> None:
        record = self.load(cmp_id)
        record["state"] = "measuring"
        self._save(record)
        serving: dict[str, Any] = {}
        targets = ["__base__"] + [
            record["names"][m] for m, j in jobs.items() if j.get("registered")
        ]

        async def measure(target: str, _round: int) -> dict[str, Any]:
            model = self.base_model_name if target == "__base__" else target
            if self.measure is None:
                return {"tok_s": None, "error": "the server is not serving yet"}
            try:
                return await self.measure(model)
            except Exception as exc:  # one adapter failing to serve must not lose the rest
                logger.exception("comparison %s: measuring %s failed", cmp_id, model)
                return {"tok_s": None, "error": f"not served: {exc}"}

        serving.update(await table.measure_in_rounds(targets, measure))
        for m, j in jobs.items():
            name = record["names"][m]
            if name not in serving and j.get("state") == "succeeded":
                why = j.get("registration_error") or "not registered (register: false)"
                serving[name] = {"tok_s": None, "error": f"not served: {why}"}
        record.update(state="done", serving=serving, finished_at=time.time())
        self._save(record)
        self._tasks.pop(cmp_id, None)
        logger.info("comparison %s done", cmp_id)


def make_throughput_probe(
    serving: Callable[[], Any],
    *,
    streams: int = table.STREAMS,
    max_tokens: int = table.SERVE_TOKENS,
) -> Measure:
    """Aggregate completion tokens/s of ``streams`` concurrent chat streams on a model,
    through the same preparation and serving path as /v1/chat/completions (``ignore_eos``:
    every stream generates ``max_tokens``), after one warm-up request."""
    from server.adapter_validation import AdapterError
    from server.errors import APIError
    from server.protocol import ChatCompletionRequest

    async def one(model: str) -> int:
        req = ChatCompletionRequest(
            model=model,
            messages=[{"role": "user", "content": table.SERVE_PROMPT}],  # type: ignore[list-item]
            max_tokens=max_tokens,
            temperature=0,
            ignore_eos=True,
            stream=True,
            stream_options={"include_usage": True},  # type: ignore[arg-type]
        )
        chat = serving().chat
        prep = await chat.prepare(req)
        tokens = 0
        async for event in chat.stream(prep, include_usage=True):
            if not event.startswith("data: {"):
                continue
            obj = json.loads(event[len("data: ") :])
            if "error" in obj:
                raise RuntimeError(obj["error"].get("message"))
            if obj.get("usage"):
                tokens = int(obj["usage"]["completion_tokens"])
        return tokens

    async def measure(model: str) -> dict[str, Any]:
        try:
            await one(model)  # warm-up: the adapter is loaded onto the device here
            started = time.perf_counter()
            counts = await asyncio.gather(*(one(model) for _ in range(streams)))
        except (APIError, AdapterError, RuntimeError) as exc:
            return {"tok_s": None, "error": f"not served: {getattr(exc, 'message', exc)}"}
        wall = time.perf_counter() - started
        return {"tok_s": sum(counts) / wall, "tokens": sum(counts), "wall_s": wall, "error": None}

    return measure
