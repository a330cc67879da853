"""The Python way to drive a swapserve server: adapters, training, retrieval, experiments,
splits and feedback. Inference stays with the `openai` SDK (`base_url=<server>/v1`).

    from clients import Swapserve

    ss = Swapserve("http://127.0.0.1:8000", api_key="...")
    job = ss.training.sft("house-style", "trainer/examples/house_style_sft.jsonl",
                          config={"max_steps": 8})
    for event in ss.training.follow(job.id):
        print(event.type, event.model_extra)
    ss.training.wait(job.id)           # the adapter is registered: model="house-style"

`AsyncSwapserve` has the same methods; each returns an awaitable (`follow` an async
iterator). Requests and answers are the server's own pydantic models (server/schemas.py,
which imports pydantic only), so a field the server renames fails here too, at once.
Errors are `clients.errors.SwapserveError` subclasses with OpenAI's error fields.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from clients.errors import SwapserveError, TrainingJobError, error_from_response
from server.schemas import (
    AdapterDeleted,
    AdapterInfo,
    AdapterList,
    ArmSpec,
    Collection,
    CollectionList,
    Deleted,
    DocumentIn,
    DocumentList,
    DryRun,
    ExperimentList,
    ExperimentRequest,
    ExperimentStatus,
    FeedbackAck,
    FeedbackRequest,
    IngestDocuments,
    IngestResult,
    MetricsHistory,
    Question,
    SearchRequest,
    SearchResult,
    Session,
    Split,
    SplitArm,
    SplitList,
    SplitRequest,
    TrainEvent,
    TrainEventList,
    TrainJob,
    TrainJobList,
)

TERMINAL_JOB_STATES = ("succeeded", "failed", "cancelled", "interrupted")
TERMINAL_EXPERIMENT_STATES = ("completed", "failed", "cancelled", "interrupted")
Records = Sequence[Mapping[str, Any] | str]


@dataclass
class _Call:
    """One HTTP request and how to read its answer; run by a sync or an async transport."""

    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    data: dict[str, Any] | None = None
    files: list[tuple[str, tuple[str, bytes]]] | None = None
    parse: Callable[[httpx.Response], Any] = field(default=lambda r: r.json())


def _model(cls: Any) -> Callable[[httpx.Response], Any]:
    return lambda r: cls.model_validate(r.json())


def _data(cls: Any) -> Callable[[httpx.Response], Any]:
    """The `data` list of a list answer."""
    return lambda r: cls.model_validate(r.json()).data


def _dump(model: Any) -> Any:
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


def _config_dict(config: Any) -> dict[str, Any]:
    """A dict, or the trainer's config object (anything with `to_dict()`)."""
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return {k: v for k, v in dict(config).items() if v is not None}


def _read_questions(questions: str | Path | Iterable[Any]) -> list[Question]:
    """A JSONL path (the experiments' question format), or Question/dict items."""
    if isinstance(questions, str | Path):
        lines = Path(questions).read_text().splitlines()
        return [Question.model_validate_json(line) for line in lines if line.strip()]
    return [q if isinstance(q, Question) else Question.model_validate(q) for q in questions]


class _SSE:
    """Server-sent events, one line at a time: `feed` returns (event, data) when a blank
    line ends an event; comments (keep-alives) are skipped."""

    def __init__(self) -> None:
        self.event, self.data = "message", []  # type: tuple[str, list[str]]

    def feed(self, line: str) -> tuple[str, Any] | None:
        if not line:
            out = (self.event, json.loads("\n".join(self.data))) if self.data else None
            self.event, self.data = "message", []
            return out
        if line.startswith("event:"):
            self.event = line[6:].strip()
        elif line.startswith("data:"):
            self.data.append(line[5:].strip())
        return None


# --- resources: each method builds a _Call; the transport runs it ----------------------------


class _Resource:
    def __init__(self, run: Callable[[_Call], Any]):
        self._run = run


class Adapters(_Resource):
    def list(self) -> list[AdapterInfo]:
        return self._run(_Call("GET", "/adapters", parse=_data(AdapterList)))

    def get(self, name: str) -> AdapterInfo:
        return self._run(_Call("GET", f"/adapters/{name}", parse=_model(AdapterInfo)))

    def register(self, name: str, path: str | Path, *, replace: bool = False) -> AdapterInfo:
        """Register a PEFT adapter folder that the *server* can read."""
        body = {"name": name, "path": str(path), "replace": replace}
        return self._run(_Call("POST", "/adapters", json=body, parse=_model(AdapterInfo)))

    def upload(self, name: str, archive: str | Path, *, replace: bool = False) -> AdapterInfo:
        """Upload a .tar.gz/.tgz/.tar/.zip of an adapter folder (a server elsewhere)."""
        archive = Path(archive)
        return self._run(
            _Call(
                "POST",
                "/adapters",
                data={"name": name, "replace": str(replace).lower()},
                files=[("file", (archive.name, archive.read_bytes()))],
                parse=_model(AdapterInfo),
            )
        )

    def delete(self, name: str) -> AdapterDeleted:
        return self._run(_Call("DELETE", f"/adapters/{name}", parse=_model(AdapterDeleted)))


class _TrainingCalls(_Resource):
    def _submit_call(
        self,
        path: str,
        name: str,
        data: str | Path | Records,
        *,
        eval_data: str | Path | Records | None,
        config: Any,
        register: bool,
        replace: bool,
        on_server: bool,
        parse: Callable[[httpx.Response], Any],
    ) -> _Call:
        cfg = _config_dict(config)
        if isinstance(data, str | Path) and not on_server:
            # a local JSONL: uploaded, as the console does
            form = {
                "name": name,
                "config": json.dumps(cfg),
                "register": str(register).lower(),
                "replace": str(replace).lower(),
            }
            files = [("file", (Path(data).name, Path(data).read_bytes()))]
            if isinstance(eval_data, str | Path):
                files.append(("eval_file", (Path(eval_data).name, Path(eval_data).read_bytes())))
            elif eval_data is not None:
                raise ValueError("with a local data file, give eval_data as a file too")
            return _Call("POST", path, data=form, files=files, parse=parse)
        body: dict[str, Any] = {
            "name": name,
            "config": cfg,
            "register": register,
            "replace": replace,
        }
        if isinstance(data, str | Path):
            body["data_path"] = str(data)
        else:
            body["data"] = [r if isinstance(r, str) else dict(r) for r in data]
        if isinstance(eval_data, str | Path):
            body["eval_path"] = str(eval_data)
        elif eval_data is not None:
            body["eval_data"] = [r if isinstance(r, str) else dict(r) for r in eval_data]
        return _Call("POST", path, json=body, parse=parse)

    def submit(
        self,
        kind: str,
        name: str,
        data: str | Path | Records,
        *,
        eval_data: str | Path | Records | None = None,
        config: Any = None,
        register: bool = True,
        replace: bool = False,
        on_server: bool = False,
    ) -> TrainJob:
        """Start a job (`kind`: sft, dpo, ...). `data` is a local JSONL file (uploaded), a
        list of records, or with `on_server=True` a path on the server. `config` is a dict
        of the trainer's fields or its config object. Refusals (config, data with line
        numbers, a taken name) raise before any training starts."""
        return self._run(
            self._submit_call(
                f"/train/{kind}",
                name,
                data,
                eval_data=eval_data,
                config=config,
                register=register,
                replace=replace,
                on_server=on_server,
                parse=_model(TrainJob),
            )
        )

    def sft(self, name: str, data: str | Path | Records, **kwargs: Any) -> TrainJob:
        return self.submit("sft", name, data, **kwargs)

    def dpo(self, name: str, data: str | Path | Records, **kwargs: Any) -> TrainJob:
        return self.submit("dpo", name, data, **kwargs)

    def dry_run(
        self,
        kind: str,
        name: str,
        data: str | Path | Records,
        *,
        eval_data: str | Path | Records | None = None,
        config: Any = None,
        on_server: bool = False,
    ) -> DryRun:
        """What the job would train on, without starting it: the first example with the
        tokens that carry loss marked, token lengths, the token rows to be trained."""
        return self._run(
            self._submit_call(
                f"/train/{kind}/dry_run",
                name,
                data,
                eval_data=eval_data,
                config=config,
                register=True,
                replace=True,
                on_server=on_server,
                parse=_model(DryRun),
            )
        )

    def list(self) -> list[TrainJob]:
        return self._run(_Call("GET", "/train/jobs", parse=_data(TrainJobList)))

    def get(self, job_id: str) -> TrainJob:
        return self._run(_Call("GET", f"/train/jobs/{job_id}", parse=_model(TrainJob)))

    def cancel(self, job_id: str) -> TrainJob:
        return self._run(_Call("DELETE", f"/train/jobs/{job_id}", parse=_model(TrainJob)))

    def events(self, job_id: str, since: int = 0) -> TrainEventList:
        """The events so far (`next_since` for the next call)."""
        return self._run(
            _Call(
                "GET",
                f"/train/jobs/{job_id}/events",
                params={"since": since},
                parse=_model(TrainEventList),
            )
        )

    def card(self, job_id: str) -> dict[str, Any]:
        """The finished adapter's card: base model, data, hyper-parameters, loss history,
        eval numbers (ConflictError until the job has succeeded)."""
        return self._run(_Call("GET", f"/train/jobs/{job_id}/card"))


class _RAG(_Resource):
    def create(
        self, name: str, *, chunk_tokens: int | None = None, overlap: int | None = None
    ) -> Collection:
        body = {"name": name, "chunk_tokens": chunk_tokens, "overlap": overlap}
        body = {k: v for k, v in body.items() if v is not None}
        return self._run(_Call("POST", "/rag/collections", json=body, parse=_model(Collection)))

    def list(self) -> list[Collection]:
        return self._run(_Call("GET", "/rag/collections", parse=_data(CollectionList)))

    def get(self, name: str) -> Collection:
        return self._run(_Call("GET", f"/rag/collections/{name}", parse=_model(Collection)))

    def delete(self, name: str) -> Deleted:
        return self._run(_Call("DELETE", f"/rag/collections/{name}", parse=_model(Deleted)))

    def add(self, name: str, documents: Iterable[DocumentIn | Mapping[str, Any]]) -> IngestResult:
        """Documents as JSON: `{"id"?, "text", "metadata"?}` each."""
        docs = [d if isinstance(d, DocumentIn) else DocumentIn.model_validate(d) for d in documents]
        body = _dump(IngestDocuments(documents=docs))
        return self._run(
            _Call(
                "POST", f"/rag/collections/{name}/documents", json=body, parse=_model(IngestResult)
            )
        )

    def ingest(
        self,
        name: str,
        files: Iterable[str | Path],
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> IngestResult:
        """Upload files: .md/.txt (one document each, id = file name), .json, .jsonl."""
        parts = [("files", (Path(f).name, Path(f).read_bytes())) for f in files]
        form = {"metadata": json.dumps(dict(metadata))} if metadata else None
        return self._run(
            _Call(
                "POST",
                f"/rag/collections/{name}/documents",
                data=form,
                files=parts,
                parse=_model(IngestResult),
            )
        )

    def documents(self, name: str, *, limit: int = 100, offset: int = 0) -> DocumentList:
        return self._run(
            _Call(
                "GET",
                f"/rag/collections/{name}/documents",
                params={"limit": limit, "offset": offset},
                parse=_model(DocumentList),
            )
        )

    def delete_document(self, name: str, doc_id: str) -> Deleted:
        return self._run(
            _Call("DELETE", f"/rag/collections/{name}/documents/{doc_id}", parse=_model(Deleted))
        )

    def search(
        self,
        name: str,
        query: str,
        *,
        top_k: int = 5,
        min_score: float | None = None,
        filter: Mapping[str, Any] | None = None,
    ) -> SearchResult:
        body = _dump(
            SearchRequest(
                query=query,
                top_k=top_k,
                min_score=min_score,
                filter=dict(filter) if filter else None,
            )
        )
        return self._run(
            _Call("POST", f"/rag/collections/{name}/search", json=body, parse=_model(SearchResult))
        )


class _ExperimentCalls(_Resource):
    def run(
        self,
        questions: str | Path | Iterable[Question | Mapping[str, Any]],
        arms: Iterable[ArmSpec | Mapping[str, Any]] = (),
        *,
        name: str | None = None,
        adapter: str | None = None,
        collection: str | None = None,
        max_tokens: int | None = None,
        concurrency: int = 4,
        seed: int = 0,
    ) -> ExperimentStatus:
        """Start an experiment: `questions` a JSONL path or a list; `arms` as
        `{"name", "model", "rag"?, ...}`, or `adapter`/`collection` for the four default
        arms (base, base+rag, adapter, adapter+rag)."""
        req = ExperimentRequest(
            name=name,
            questions=_read_questions(questions),
            arms=[a if isinstance(a, ArmSpec) else ArmSpec.model_validate(a) for a in arms],
            adapter=adapter,
            collection=collection,
            max_tokens=max_tokens,
            concurrency=concurrency,
            seed=seed,
        )
        return self._run(
            _Call("POST", "/ab/experiments", json=_dump(req), parse=_model(ExperimentStatus))
        )

    def list(self) -> list[ExperimentStatus]:
        return self._run(_Call("GET", "/ab/experiments", parse=_data(ExperimentList)))

    def get(self, exp_id: str) -> ExperimentStatus:
        """Progress, and when done the summary (scores with intervals, latency, tokens,
        differences from the first arm) and every answer."""
        return self._run(_Call("GET", f"/ab/experiments/{exp_id}", parse=_model(ExperimentStatus)))

    def cancel(self, exp_id: str) -> ExperimentStatus:
        return self._run(
            _Call("DELETE", f"/ab/experiments/{exp_id}", parse=_model(ExperimentStatus))
        )

    def report(self, exp_id: str) -> str:
        """The self-contained HTML report with its charts."""
        return self._run(_Call("GET", f"/ab/experiments/{exp_id}/report", parse=lambda r: r.text))


class _Splits(_Resource):
    def create(
        self, name: str, arms: Iterable[SplitArm | Mapping[str, Any]], *, replace: bool = False
    ) -> Split:
        """Online A/B: requests with model `ab:<name>` go to one arm, sticky per `user`."""
        req = SplitRequest(
            name=name,
            arms=[a if isinstance(a, SplitArm) else SplitArm.model_validate(a) for a in arms],
            replace=replace,
        )
        return self._run(_Call("POST", "/ab/splits", json=_dump(req), parse=_model(Split)))

    def list(self) -> list[Split]:
        return self._run(_Call("GET", "/ab/splits", parse=_data(SplitList)))

    def get(self, name: str) -> Split:
        return self._run(_Call("GET", f"/ab/splits/{name}", parse=_model(Split)))

    def preferences(self, name: str) -> list[dict[str, Any]]:
        """Feedback as DPO pairs (`prompt`, `chosen`, `rejected`): training data. A split
        with no pair yet raises NotFoundError."""
        return self._run(
            _Call(
                "GET",
                f"/ab/splits/{name}/preferences.jsonl",
                parse=lambda r: [json.loads(x) for x in r.text.splitlines() if x.strip()],
            )
        )

    def kto(self, name: str) -> list[dict[str, Any]]:
        """Every rated answer as KTO data (`prompt`, `completion`, `label`): training data
        for `swapserve train kto`. A split with no feedback yet raises NotFoundError."""
        return self._run(
            _Call(
                "GET",
                f"/ab/splits/{name}/kto.jsonl",
                parse=lambda r: [json.loads(x) for x in r.text.splitlines() if x.strip()],
            )
        )

    def feedback(
        self, response_id: str, *, rating: int | None = None, preferred_over: str | None = None
    ) -> FeedbackAck:
        """Rate an answer given under a split (+1/-1), or say it beat another one."""
        req = FeedbackRequest(
            response_id=response_id,
            rating=rating,  # type: ignore[arg-type]
            preferred_over=preferred_over,
        )
        return self._run(_Call("POST", "/ab/feedback", json=_dump(req), parse=_model(FeedbackAck)))


# --- sync ---------------------------------------------------------------------------------------


class Training(_TrainingCalls):
    def follow(self, job_id: str, since: int = 0) -> Iterator[TrainEvent]:
        """The job's events as they happen (progress with step, loss, eta; state changes),
        until it has settled; reconnects where it left off if the connection drops."""
        client: httpx.Client = self._client  # type: ignore[attr-defined]
        while True:
            try:
                with client.stream(
                    "GET",
                    f"/train/jobs/{job_id}/events",
                    params={"since": since},
                    headers={"Accept": "text/event-stream"},
                ) as r:
                    if r.status_code >= 400:
                        r.read()
                        raise error_from_response(r)
                    sse = _SSE()
                    for line in r.iter_lines():
                        if (parsed := sse.feed(line)) is None:
                            continue
                        event, data = parsed
                        if event == "end":
                            return
                        ev = TrainEvent.model_validate(data)
                        since = ev.seq + 1
                        yield ev
                return
            except (httpx.RemoteProtocolError, httpx.ReadTimeout):
                time.sleep(1.0)

    def wait(self, job_id: str, *, timeout: float | None = None, poll_s: float = 2.0) -> TrainJob:
        """Block until the job has settled (and, on success, registered); return it.
        Raises TrainingJobError if it did not succeed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job.state in TERMINAL_JOB_STATES and (
                job.state != "succeeded" or job.registered or not job.register_
            ):
                break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job.state} after {timeout} s")
            time.sleep(poll_s)
        if job.state != "succeeded":
            raise TrainingJobError(job)
        return job


class Experiments(_ExperimentCalls):
    def follow(self, exp_id: str, *, poll_s: float = 2.0) -> Iterator[ExperimentStatus]:
        """The experiment's status each time its progress moves, until it ends."""
        last = None
        while True:
            status = self.get(exp_id)
            key = (status.status, status.progress.get("done"))
            if key != last:
                last = key
                yield status
            if status.status in TERMINAL_EXPERIMENT_STATES:
                return
            time.sleep(poll_s)

    def wait(self, exp_id: str, *, timeout: float | None = None) -> ExperimentStatus:
        deadline = None if timeout is None else time.monotonic() + timeout
        for status in self.follow(exp_id):
            if status.status in TERMINAL_EXPERIMENT_STATES:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"experiment {exp_id} still running after {timeout} s")
        raise AssertionError("unreachable")


class Swapserve:
    """A client for one server. `api_key` is sent as `Authorization: Bearer`."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        *,
        timeout: float = 600.0,
    ):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        self.adapters = Adapters(self._run)
        self.training = Training(self._run)
        self.training._client = self._client  # type: ignore[attr-defined]
        self.rag = _RAG(self._run)
        self.experiments = Experiments(self._run)
        self.splits = _Splits(self._run)

    def _run(self, call: _Call) -> Any:
        r = self._client.request(
            call.method,
            call.path,
            params=call.params,
            json=call.json,
            data=call.data,
            files=call.files,
        )
        if r.status_code >= 400:
            raise error_from_response(r)
        return call.parse(r)

    def ready(self) -> dict[str, Any]:
        """/ready: model, device, quantization, memory (raises 503 while loading)."""
        return self._run(_Call("GET", "/ready"))

    def wait_ready(self, timeout: float = 300.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.ready()
            except (SwapserveError, httpx.TransportError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def session(self) -> Session:
        """Who this key is: its name and scopes."""
        return self._run(_Call("GET", "/auth/session", parse=_model(Session)))

    def metrics_history(self) -> MetricsHistory:
        """Tokens/s, requests/s, queue depth and batch size over the last minutes."""
        return self._run(_Call("GET", "/metrics/history", parse=_model(MetricsHistory)))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Swapserve:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- async --------------------------------------------------------------------------------------


class AsyncTraining(_TrainingCalls):
    async def follow(self, job_id: str, since: int = 0) -> AsyncIterator[TrainEvent]:
        client: httpx.AsyncClient = self._client  # type: ignore[attr-defined]
        while True:
            try:
                async with client.stream(
                    "GET",
                    f"/train/jobs/{job_id}/events",
                    params={"since": since},
                    headers={"Accept": "text/event-stream"},
                ) as r:
                    if r.status_code >= 400:
                        await r.aread()
                        raise error_from_response(r)
                    sse = _SSE()
                    async for line in r.aiter_lines():
                        if (parsed := sse.feed(line)) is None:
                            continue
                        event, data = parsed
                        if event == "end":
                            return
                        ev = TrainEvent.model_validate(data)
                        since = ev.seq + 1
                        yield ev
                return
            except (httpx.RemoteProtocolError, httpx.ReadTimeout):
                await asyncio.sleep(1.0)

    async def wait(
        self, job_id: str, *, timeout: float | None = None, poll_s: float = 2.0
    ) -> TrainJob:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = await self.get(job_id)  # type: ignore[misc]
            if job.state in TERMINAL_JOB_STATES and (
                job.state != "succeeded" or job.registered or not job.register_
            ):
                break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job.state} after {timeout} s")
            await asyncio.sleep(poll_s)
        if job.state != "succeeded":
            raise TrainingJobError(job)
        return job


class AsyncExperiments(_ExperimentCalls):
    async def follow(self, exp_id: str, *, poll_s: float = 2.0) -> AsyncIterator[ExperimentStatus]:
        last = None
        while True:
            status = await self.get(exp_id)  # type: ignore[misc]
            key = (status.status, status.progress.get("done"))
            if key != last:
                last = key
                yield status
            if status.status in TERMINAL_EXPERIMENT_STATES:
                return
            await asyncio.sleep(poll_s)

    async def wait(self, exp_id: str, *, timeout: float | None = None) -> ExperimentStatus:
        deadline = None if timeout is None else time.monotonic() + timeout
        async for status in self.follow(exp_id):
            if status.status in TERMINAL_EXPERIMENT_STATES:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"experiment {exp_id} still running after {timeout} s")
        raise AssertionError("unreachable")


class AsyncSwapserve:
    """`Swapserve` for asyncio: the same methods, each awaited."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        *,
        timeout: float = 600.0,
    ):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._client = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout)
        self.adapters = Adapters(self._run)
        self.training = AsyncTraining(self._run)
        self.training._client = self._client  # type: ignore[attr-defined]
        self.rag = _RAG(self._run)
        self.experiments = AsyncExperiments(self._run)
        self.splits = _Splits(self._run)

    async def _run(self, call: _Call) -> Any:
        r = await self._client.request(
            call.method,
            call.path,
            params=call.params,
            json=call.json,
            data=call.data,
            files=call.files,
        )
        if r.status_code >= 400:
            raise error_from_response(r)
        return call.parse(r)

    async def ready(self) -> dict[str, Any]:
        return await self._run(_Call("GET", "/ready"))

    async def session(self) -> Session:
        return await self._run(_Call("GET", "/auth/session", parse=_model(Session)))

    async def metrics_history(self) -> MetricsHistory:
        return await self._run(_Call("GET", "/metrics/history", parse=_model(MetricsHistory)))

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> AsyncSwapserve:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
