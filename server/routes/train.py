"""Training routes: submit jobs (one route per objective: sft, dpo, orpo, kto; the PEFT
method is ``config.method``), compare methods, follow jobs, cancel them.

A job request is JSON (``data_path`` on the server, or ``data``: the JSONL records inline)
or multipart (``file`` = the JSONL upload, ``config`` as a JSON string). Every refusal
(config, data with line numbers, base model, name) comes back as a 4xx in the OpenAI error
shape before any training starts; the answer to an accepted job is 202 with its record.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from server.errors import APIError
from server.openapi import error_responses, request_body
from server.schemas import (
    DryRun,
    ErrorResponse,
    TrainCompare,
    TrainCompareList,
    TrainCompareRequest,
    TrainEventList,
    TrainJob,
    TrainJobList,
    TrainJobRequest,
    TrainJobUpload,
)
from server.state import SettingsDep
from server.training import BaseModelMismatch, TrainingService, is_settled
from trainer.config import ConfigError
from trainer.data import DataError
from trainer.jobs import JobConflict, JobNotFound, JobStateError
from trainer.objectives import get_objective, objective_names

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/train", tags=["train"])

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 409, 413, 503)
}
SSE_POLL_S = 0.5
# request fields a ConfigError may name directly (the rest are config.<field>)
TOP_LEVEL = ("name", "config", "methods", "method_config", "objective")
SSE_KEEPALIVE_S = 15.0


def get_training(request: Request) -> TrainingService:
    training = getattr(request.app.state, "training", None)
    if training is None:
        error = getattr(request.app.state, "training_error", None)
        if error:
            raise APIError(503, f"training is unavailable: {error}", code="training_unavailable")
        raise APIError(503, "the base model is still loading", code="model_loading")
    return training


TrainingDep = Annotated[TrainingService, Depends(get_training)]


# --- models -------------------------------------------------------------------------------------


# --- errors ---------------------------------------------------------------------------------------


@contextmanager
def job_errors() -> Iterator[None]:
    """Trainer exceptions -> the OpenAI error shape with the matching status."""
    try:
        yield
    except BaseModelMismatch as exc:
        raise APIError(
            400, str(exc), param="config.base_model", code="base_model_mismatch"
        ) from exc
    except ConfigError as exc:
        param = exc.field if exc.field in TOP_LEVEL else f"config.{exc.field}"
        raise APIError(400, str(exc), param=param, code="invalid_config") from exc
    except DataError as exc:
        param = exc.path if exc.path in ("data", "file", "eval_data", "eval_file") else "data"
        raise APIError(400, str(exc), param=param, code="invalid_data") from exc
    except JobNotFound as exc:
        raise APIError(404, str(exc), param="job_id", code="job_not_found") from exc
    except JobConflict as exc:
        raise APIError(409, str(exc), param="name", code="job_conflict") from exc
    except JobStateError as exc:
        raise APIError(409, str(exc), param="job_id", code="job_state") from exc


# --- submit ---------------------------------------------------------------------------------------


def _write_records(path: Path, records: list[dict[str, Any] | str]) -> Path:
    lines = (r if isinstance(r, str) else json.dumps(r) for r in records)
    path.write_text("".join(line.rstrip("\n") + "\n" for line in lines))
    return path


def _form_bool(value: Any, default: bool) -> bool:
    if value is None:
        return default
    return str(value).lower() in ("1", "true", "yes", "on")


async def _save_upload(upload: UploadFile, dest: Path) -> Path:
    with open(dest, "wb") as fh:
        await asyncio.to_thread(shutil.copyfileobj, upload.file, fh)
    return dest


async def _submit(
    kind: str,
    request: Request,
    training: TrainingService,
    staging_root: Path,
    *,
    dry: bool = False,
) -> dict[str, Any]:
    staging_root.mkdir(parents=True, exist_ok=True)
    # The manager copies the data into the job folder, so the staged files may go at once.
    with tempfile.TemporaryDirectory(dir=staging_root) as tmp:
        staging = Path(tmp)
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            body = await _from_form(request, staging)
        else:
            body = await _from_json(request, staging)
        if dry:
            for key in ("name", "register", "replace"):
                body.pop(key)
            with job_errors():
                return await asyncio.to_thread(training.dry_run, kind, **body)
        with job_errors():
            record = await asyncio.to_thread(training.submit, kind, **body)
    logger.info("accepted %s job %s for adapter %r", kind, record["id"], record["name"])
    return training.view(record)


async def _from_json(request: Request, staging: Path) -> dict[str, Any]:
    try:
        req = TrainJobRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        # the app's handler turns it into the 400 every malformed request gets
        raise RequestValidationError(exc.errors()) from exc
    if req.model_extra:
        logger.warning("train request: ignoring unknown fields %s", sorted(req.model_extra))
    if (req.data_path is None) == (req.data is None):
        raise APIError(
            400,
            "give exactly one of data_path (a file on the server) or data (inline records)",
            param="data",
            code="invalid_request",
        )
    if req.eval_path is not None and req.eval_data is not None:
        raise APIError(400, "give eval_path or eval_data, not both", param="eval_data")
    if req.data is not None:
        data, label = _write_records(staging / "data.jsonl", req.data), "data"
    else:
        data, label = Path(req.data_path or "").expanduser(), req.data_path or "data_path"
    eval_path, eval_label = None, None
    if req.eval_data is not None:
        eval_path, eval_label = _write_records(staging / "eval.jsonl", req.eval_data), "eval_data"
    elif req.eval_path is not None:
        eval_path, eval_label = Path(req.eval_path).expanduser(), req.eval_path
    return {
        "name": req.name,
        "config": req.config,
        "data_path": data,
        "data_label": label,
        "eval_path": eval_path,
        "eval_label": eval_label,
        "register": req.register_,
        "replace": req.replace,
    }


async def _from_form(request: Request, staging: Path) -> dict[str, Any]:
    form = await request.form()
    name = form.get("name")
    if not isinstance(name, str) or not name:
        raise APIError(400, "form field 'name' is required", param="name")
    raw_config = form.get("config")
    config: Any = {}
    if isinstance(raw_config, str) and raw_config.strip():
        try:
            config = json.loads(raw_config)
        except json.JSONDecodeError as exc:
            raise APIError(
                400, f"form field 'config' is not valid JSON: {exc}", param="config"
            ) from exc
    upload, data_path = form.get("file"), form.get("data_path")
    if isinstance(upload, UploadFile):
        data = await _save_upload(upload, staging / "data.jsonl")
        label = upload.filename or "file"
    elif isinstance(data_path, str) and data_path:
        data, label = Path(data_path).expanduser(), data_path
    else:
        raise APIError(400, "form field 'file' (the JSONL data) is required", param="file")
    eval_upload, eval_path_field = form.get("eval_file"), form.get("eval_path")
    eval_path, eval_label = None, None
    if isinstance(eval_upload, UploadFile):
        eval_path = await _save_upload(eval_upload, staging / "eval.jsonl")
        eval_label = eval_upload.filename or "eval_file"
    elif isinstance(eval_path_field, str) and eval_path_field:
        eval_path, eval_label = Path(eval_path_field).expanduser(), eval_path_field
    return {
        "name": name,
        "config": config,
        "data_path": data,
        "data_label": label,
        "eval_path": eval_path,
        "eval_label": eval_label,
        "register": _form_bool(form.get("register"), True),
        "replace": _form_bool(form.get("replace"), False),
    }


def _request_body_doc(kind: str) -> dict[str, Any]:
    return {
        **request_body(json=TrainJobRequest, multipart=TrainJobUpload),
        "summary": f"Start a {kind.upper()} training job",
    }


def _dry_run_doc(kind: str) -> dict[str, Any]:
    return {
        **request_body(json=TrainJobRequest, multipart=TrainJobUpload),
        "summary": f"Dry run of a {kind.upper()} job: what it would train on; starts nothing",
    }


def _objective_routes(kind: str, summary: str, data: str) -> None:
    """POST /train/<kind> and /train/<kind>/dry_run: one pair per objective of the
    trainer's table (the PEFT method is config.method)."""

    async def submit(request: Request, training: TrainingDep, settings: SettingsDep) -> Any:
        return await _submit(kind, request, training, settings.data_dir / "train-staging")

    submit.__name__ = f"train_{kind}"
    submit.__doc__ = f"{summary[0].upper()}{summary[1:]}. Data: {data}."
    router.post(
        f"/{kind}",
        status_code=202,
        response_model=TrainJob,
        responses=ERRORS,
        openapi_extra=_request_body_doc(kind),
    )(submit)

    async def dry_run(request: Request, training: TrainingDep, settings: SettingsDep) -> Any:
        staging = settings.data_dir / "train-staging"
        return await _submit(kind, request, training, staging, dry=True)

    dry_run.__name__ = f"dry_run_{kind}"
    dry_run.__doc__ = (
        f"The same body as POST /train/{kind}, refused the same way; answers with the first "
        "examples' loss masks (the tokens between `loss_open` and `loss_close` carry loss), "
        "the token lengths, the method and the token rows that would be trained. Loads the "
        "tokenizer only."
    )
    router.post(
        f"/{kind}/dry_run",
        response_model=DryRun,
        responses=ERRORS,
        openapi_extra=_dry_run_doc(kind),
    )(dry_run)


for _kind in objective_names():
    _objective = get_objective(_kind)
    _objective_routes(_kind, _objective.summary, _objective.data)


# --- compare methods --------------------------------------------------------------------------


@router.post("/compare", status_code=202, response_model=TrainCompare, responses=ERRORS)
async def compare_methods(
    body: TrainCompareRequest, training: TrainingDep, settings: SettingsDep
) -> dict[str, Any]:
    """Train every method with the same objective, data and budget (one job each, one at a
    time), register the results, then measure serving tok/s of 8 streams on each: follow it
    with GET /train/compare/{id}; GET /train/compare/{id}/report is the HTML report."""
    staging_root = settings.data_dir / "train-staging"
    staging_root.mkdir(parents=True, exist_ok=True)
    if (body.data_path is None) == (body.data is None):
        raise APIError(400, "give exactly one of data_path or data", param="data")
    if (body.eval_path is None) == (body.eval_data is None):
        raise APIError(
            400,
            "give exactly one of eval_path or eval_data: every method is evaluated on it",
            param="eval_data",
        )
    with tempfile.TemporaryDirectory(dir=staging_root) as tmp:
        staging = Path(tmp)
        if body.data is not None:
            data, label = _write_records(staging / "data.jsonl", body.data), "data"
        else:
            data, label = Path(body.data_path or "").expanduser(), body.data_path or "data_path"
        if body.eval_data is not None:
            ev, ev_label = _write_records(staging / "eval.jsonl", body.eval_data), "eval_data"
        else:
            ev, ev_label = Path(body.eval_path or "").expanduser(), body.eval_path or "eval_path"
        with job_errors():
            return await asyncio.to_thread(
                training.compare.submit,
                name=body.name,
                methods=body.methods,
                objective=body.objective,
                config=body.config,
                method_config=body.method_config,
                data_path=data,
                data_label=label,
                eval_path=ev,
                eval_label=ev_label,
                register=body.register_,
                replace=body.replace,
            )


@router.get("/compare", response_model=TrainCompareList)
async def list_comparisons(training: TrainingDep) -> dict[str, Any]:
    records = await asyncio.to_thread(training.compare.records)
    return {"object": "list", "data": [training.compare.view(r) for r in records]}


@router.get("/compare/{cmp_id}", response_model=TrainCompare, responses=ERRORS)
async def get_comparison(cmp_id: str, training: TrainingDep) -> dict[str, Any]:
    # on the event loop: a comparison whose jobs have all ended starts measuring here
    with job_errors():
        return training.compare.get(cmp_id)


@router.get(
    "/compare/{cmp_id}/report",
    response_class=HTMLResponse,
    # errors are JSON in the one error shape, also on this HTML route
    responses={**error_responses(404, 503), 200: {"content": {"text/html": {}}}},
)
async def comparison_report(cmp_id: str, training: TrainingDep) -> HTMLResponse:
    with job_errors():
        return HTMLResponse(training.compare.report(cmp_id))


@router.delete("/compare/{cmp_id}", response_model=TrainCompare, responses=ERRORS)
async def cancel_comparison(cmp_id: str, training: TrainingDep) -> dict[str, Any]:
    """Cancel every job of the comparison that has not ended."""
    with job_errors():
        return await asyncio.to_thread(training.compare.cancel, cmp_id)


# --- follow and cancel ------------------------------------------------------------------------------


@router.get("/jobs", response_model=TrainJobList)
async def list_jobs(training: TrainingDep) -> dict[str, Any]:
    records = await asyncio.to_thread(training.manager.list)
    return {"object": "list", "data": [training.view(r) for r in records]}


@router.get("/jobs/{job_id}", response_model=TrainJob, responses=ERRORS)
async def get_job(job_id: str, training: TrainingDep) -> dict[str, Any]:
    with job_errors():
        return training.view(training.manager.get(job_id))


@router.delete("/jobs/{job_id}", response_model=TrainJob, responses=ERRORS)
async def cancel_job(job_id: str, training: TrainingDep) -> dict[str, Any]:
    """Queued: cancelled at once. Running: stops at its next step (state turns 'cancelled'
    when the worker has exited). Finished: 409."""
    with job_errors():
        record = await asyncio.to_thread(training.manager.cancel, job_id)
    return training.view(record)


@router.get("/jobs/{job_id}/card", response_model=dict[str, Any], responses=ERRORS)
async def job_card(job_id: str, training: TrainingDep) -> dict[str, Any]:
    """The adapter's card once the job has succeeded (409 before): base model, data,
    hyper-parameters, library versions, loss history, eval numbers, wall time, memory."""
    with job_errors():
        return await asyncio.to_thread(training.card, job_id)


@router.get(
    "/jobs/{job_id}/events",
    response_model=TrainEventList,
    responses={
        **ERRORS,
        200: {
            "description": "JSON list, or a live SSE stream with `Accept: text/event-stream` "
            "(one `event: <type>` per job event, `id` = seq; ends with `event: end`).",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
    },
)
async def job_events(
    job_id: str,
    request: Request,
    training: TrainingDep,
    since: Annotated[int, Query(ge=0, description="First event sequence number to return.")] = 0,
) -> Any:
    with job_errors():
        record = training.manager.get(job_id)
        events = await asyncio.to_thread(training.manager.events, job_id, since)
    if "text/event-stream" in request.headers.get("accept", ""):
        last = request.headers.get("last-event-id")
        start = int(last) + 1 if last and last.isdigit() else since
        return StreamingResponse(
            _event_stream(job_id, start, request, training),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    next_since = events[-1]["seq"] + 1 if events else since
    return {"object": "list", "data": events, "next_since": next_since, "state": record["state"]}


def _sse(event: str, data: Any, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, default=str)}\n\n"


async def _event_stream(
    job_id: str, since: int, request: Request, training: TrainingService
) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    last_sent = loop.time()
    settled_seen = False
    aborting = request.app.state.drain.aborting
    while True:
        if await request.is_disconnected():
            return
        if aborting.is_set():  # the server's shutdown grace is over: end, don't tear
            record = await asyncio.to_thread(training.manager.get, job_id)
            yield _sse("end", training.view(record))
            return
        events = await asyncio.to_thread(training.manager.events, job_id, since)
        for event in events:
            yield _sse(event["type"], event, event["seq"])
            since = event["seq"] + 1
            last_sent = loop.time()
        record = await asyncio.to_thread(training.manager.get, job_id)
        if is_settled(record):
            # One more read after settling: the closing event is appended just after
            # the record is written.
            if settled_seen and not events:
                yield _sse("end", training.view(record))
                return
            settled_seen = True
        if loop.time() - last_sent > SSE_KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last_sent = loop.time()
        await asyncio.sleep(SSE_POLL_S)
