"""A/B routes: offline experiments, online splits, feedback, preference export (DPO pairs
and KTO rated answers).

Thin: the work is in server/ab/ (experiments.py, splits.py, report.py).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response

from server.ab.experiments import ExperimentService
from server.ab.report import render_report
from server.ab.splits import Export, SplitService
from server.openapi import error_responses
from server.schemas import (
    ErrorResponse,
    ExperimentList,
    ExperimentRequest,
    ExperimentStatus,
    FeedbackAck,
    FeedbackRequest,
    Split,
    SplitList,
    SplitRequest,
)

router = APIRouter(prefix="/ab", tags=["ab"])
# feedback comes from the applications that got the answers: inference scope
feedback_router = APIRouter(prefix="/ab", tags=["ab"])

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 409, 503)
}


def get_experiments(request: Request) -> ExperimentService:
    return request.app.state.ab_experiments


def get_splits(request: Request) -> SplitService:
    return request.app.state.ab_splits


ExperimentsDep = Annotated[ExperimentService, Depends(get_experiments)]
SplitsDep = Annotated[SplitService, Depends(get_splits)]


@router.post("/experiments", status_code=202, response_model=ExperimentStatus, responses=ERRORS)
async def create_experiment(body: ExperimentRequest, service: ExperimentsDep) -> ExperimentStatus:
    return service.status(service.submit(body), detail=False)


@router.get("/experiments", response_model=ExperimentList)
async def list_experiments(service: ExperimentsDep) -> ExperimentList:
    return ExperimentList(data=[service.status(r, detail=False) for r in service.records.values()])


@router.get("/experiments/{exp_id}", response_model=ExperimentStatus, responses=ERRORS)
async def get_experiment(exp_id: str, service: ExperimentsDep) -> ExperimentStatus:
    return service.status(service.get(exp_id))


@router.delete("/experiments/{exp_id}", response_model=ExperimentStatus, responses=ERRORS)
async def cancel_experiment(exp_id: str, service: ExperimentsDep) -> ExperimentStatus:
    return service.status(service.cancel(exp_id), detail=False)


@router.get(
    "/experiments/{exp_id}/report",
    response_class=HTMLResponse,
    responses={**error_responses(404), 200: {"content": {"text/html": {}}}},
)
async def experiment_report(exp_id: str, service: ExperimentsDep) -> HTMLResponse:
    return HTMLResponse(render_report(service.get(exp_id)))


@router.post("/splits", status_code=201, response_model=Split, responses=ERRORS)
async def create_split(body: SplitRequest, splits: SplitsDep) -> Split:
    return splits.create(body)


@router.get("/splits", response_model=SplitList)
async def list_splits(splits: SplitsDep) -> SplitList:
    return SplitList(data=[splits.get(name) for name in splits.splits])


@router.get("/splits/{name}", response_model=Split, responses=ERRORS)
async def get_split(name: str, splits: SplitsDep) -> Split:
    return splits.get(name)


EXPORT_RESPONSES: dict[int | str, dict[str, Any]] = {
    **error_responses(404),
    200: {
        "content": {"application/jsonl": {}},
        "headers": {
            "X-Swapserve-Left-Out": {
                "description": "rated answers left out because the trainer would refuse "
                "their line (each is logged with its response id and reason)",
                "schema": {"type": "integer"},
            }
        },
    },
}


def _jsonl(export: Export) -> Response:
    return Response(
        export.jsonl(),
        media_type="application/jsonl",
        headers={"X-Swapserve-Left-Out": str(len(export.left_out))},
    )


@router.get("/splits/{name}/preferences.jsonl", response_class=Response, responses=EXPORT_RESPONSES)
async def export_preferences(name: str, splits: SplitsDep) -> Response:
    """Feedback as DPO pairs ({prompt, chosen, rejected}): `swapserve train dpo`; a 404
    (`no_feedback`) saying why when there is no pair."""
    return _jsonl(splits.preference_pairs(name))


@router.get("/splits/{name}/kto.jsonl", response_class=Response, responses=EXPORT_RESPONSES)
async def export_rated_answers(name: str, splits: SplitsDep) -> Response:
    """Every rated answer as KTO data ({prompt, completion, label}): `swapserve train kto`;
    a 404 (`no_feedback`) saying why when nothing is rated."""
    return _jsonl(splits.rated_answers(name))


@feedback_router.post("/feedback", response_model=FeedbackAck, responses=ERRORS)
async def feedback(body: FeedbackRequest, splits: SplitsDep) -> FeedbackAck:
    rec = splits.add_feedback(body)
    return FeedbackAck(response_id=rec["id"], split=rec["split"], arm=rec["arm"])
