"""Liveness, readiness (`router`) and metrics (`metrics_router`)."""

from __future__ import annotations

import os
import resource
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server.state import MetricsDep

# two routers so create_app can mount them with different scopes: probes stay open,
# metrics (which name every adapter) need admin
router = APIRouter(tags=["ops"])
metrics_router = APIRouter(tags=["ops"])


def _rss_bytes() -> int:
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: peak RSS is the best we have
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _huge_pages_bytes() -> int | None:
    """This process's memory in 2 MB pages (Linux's AnonHugePages; None elsewhere)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "model not loaded yet, or shutting down"}})
async def ready(request: Request) -> Any:
    drain = getattr(request.app.state, "drain", None)
    if drain is not None and drain.draining:
        return JSONResponse(
            {
                "status": "draining",
                "in_flight": drain.in_flight,
                "grace_left_s": round(drain.grace_left_s(), 1),
            },
            status_code=503,
        )
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        error = getattr(request.app.state, "load_error", None)
        return JSONResponse(
            {"status": "failed" if error else "loading", "error": error}, status_code=503
        )
    info = engine.info
    return {
        "status": "ready",
        "model": info.model_id,
        "engine": info.engine,
        "device": info.device,
        "quantization": info.quantization,
        "max_model_len": info.max_model_len,
        "num_parameters": info.num_parameters,
        "weights_bytes": info.weights_bytes,
        "fp32_weights_bytes": info.fp32_bytes,
        "weights_vs_fp32": round(info.weights_bytes / max(1, info.fp32_bytes), 3),
        "weights_format": info.weights_format,
        "runner": info.runner,
        "process_rss_bytes": _rss_bytes(),
        "process_huge_pages_bytes": _huge_pages_bytes(),
    }


@metrics_router.get("/metrics", response_class=Response)
async def metrics(metrics: MetricsDep, request: Request) -> Response:
    engine = getattr(request.app.state, "engine", None)
    if engine is not None:
        metrics.watch_engine(
            lambda: {
                **engine.stats(),
                "weights_bytes": engine.info.weights_bytes,
                "process_rss_bytes": _rss_bytes(),
            }
        )
    return Response(metrics.render(), media_type="text/plain; version=0.0.4")
