"""The web console at /ui, and the two small reads it needs besides the API itself.

`router` serves the console's files, open like /docs: they hold no data, and every call
the page makes goes to the API with the key the user typed, under that key's scopes.
`session_router` (inference scope) says who a key is, and the server's recent load.

The console is plain HTML, CSS and JavaScript modules, written without a bundler (nothing
to build, nothing fetched from a CDN): server/console/.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, RedirectResponse

from server.auth import ADMIN, INFERENCE, current_key
from server.openapi import error_responses
from server.schemas import MetricsHistory, Session

STATIC = Path(__file__).resolve().parent.parent / "console"
# the files the console is made of, and nothing else under that folder
FILES = {p.name: p for p in STATIC.iterdir() if p.is_file()} if STATIC.is_dir() else {}

router = APIRouter(tags=["console"])
session_router = APIRouter(tags=["console"])


@router.get("/ui", include_in_schema=False)
async def console_index() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/ui/", include_in_schema=False)
async def console_slash() -> RedirectResponse:
    return RedirectResponse("/ui")


@router.get(
    "/ui/{filename}",
    include_in_schema=False,
    responses=error_responses(404),
)
async def console_file(filename: str) -> FileResponse:
    path = FILES.get(filename)
    if path is None:
        from server.errors import APIError

        raise APIError(404, f"no console file named {filename!r}", code="not_found")
    media_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    if filename.endswith(".js"):
        media_type = "text/javascript"
    return FileResponse(path, media_type=media_type, headers={"Cache-Control": "no-cache"})


@session_router.get("/auth/session", response_model=Session)
async def session(request: Request) -> Session:
    """The caller's key: its name and scopes (the console hides what a key cannot do)."""
    key = current_key()
    if key is None:  # a server without keys: everyone may do everything
        return Session(
            auth_enabled=False,
            key_name=None,
            scopes=[ADMIN, INFERENCE],
            admin=True,
            models=None,
            collections=None,
        )
    return Session(
        auth_enabled=True,
        key_name=key.name,
        scopes=sorted(key.scopes),
        admin=key.has_scope(ADMIN),
        models=sorted(key.models) if key.models is not None else None,
        collections=sorted(key.collections) if key.collections is not None else None,
    )


@session_router.get("/metrics/history", response_model=MetricsHistory)
async def metrics_history(request: Request) -> dict[str, Any]:
    """Tokens/s, requests/s, queue depth and batch size, one sample every few seconds over
    the last minutes. Totals only: no adapter or collection names."""
    return request.app.state.metrics_history.view()
