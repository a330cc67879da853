"""What the routes may reach: services on app.state, handed out as dependencies."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.config import Settings
from server.engine.base import Engine
from server.errors import APIError
from server.metrics import ServerMetrics
from server.retrieval import RetrievalService
from server.serving import OpenAIServing


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> ServerMetrics:
    return request.app.state.metrics


def get_engine(request: Request) -> Engine:
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise APIError(503, _not_ready_message(request), code="model_loading")
    return engine


def get_serving(request: Request) -> OpenAIServing:
    serving = getattr(request.app.state, "serving", None)
    if serving is None:
        raise APIError(503, _not_ready_message(request), code="model_loading")
    return serving


def get_retrieval(request: Request) -> RetrievalService:
    # Set in create_app, not after the model loads: collections need no engine.
    return request.app.state.rag


def _not_ready_message(request: Request) -> str:
    error = getattr(request.app.state, "load_error", None)
    if error:
        return f"the base model failed to load: {error}"
    return "the base model is still loading; retry when GET /ready answers 200"


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[ServerMetrics, Depends(get_metrics)]
EngineDep = Annotated[Engine, Depends(get_engine)]
ServingDep = Annotated[OpenAIServing, Depends(get_serving)]
RetrievalDep = Annotated[RetrievalService, Depends(get_retrieval)]
