"""Errors from the server, as typed exceptions carrying OpenAI's error fields.

Every error the server sends has one shape, `{"error": {"message", "type", "param",
"code"}}`; each status gets its own class (named as the `openai` SDK names them), and all
of them are `SwapserveError`, so `except SwapserveError` catches every refusal.
"""

from __future__ import annotations

import json
from typing import Any

import httpx


class SwapserveError(Exception):
    """A 4xx or 5xx from the server. `status`, `message`, `type`, `param` and `code` are
    the error body's fields; `body` the whole of it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        body: Any = None,
    ):
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.body = body
        where = f" (param {param})" if param else ""
        super().__init__(f"{status} {code or type or 'error'}: {message}{where}")


class BadRequestError(SwapserveError):
    """400: a field is wrong; `param` names it."""


class AuthenticationError(SwapserveError):
    """401: no key, or a key the server does not know."""


class PermissionDeniedError(SwapserveError):
    """403: the key lacks the scope (admin routes need an `admin` key)."""


class NotFoundError(SwapserveError):
    """404: no such adapter, job, collection, experiment or split."""


class ConflictError(SwapserveError):
    """409: the name is taken (pass replace=True), or the job has finished."""


class PayloadTooLargeError(SwapserveError):
    """413: over a size limit."""


class UnprocessableEntityError(SwapserveError):
    """415/422: the content cannot be read (not UTF-8, an unknown filter field, ...)."""


class RateLimitError(SwapserveError):
    """429: too many requests or streams for this key, or the queue is full."""


class InternalServerError(SwapserveError):
    """5xx other than 503."""


class ServiceUnavailableError(SwapserveError):
    """503: the model is still loading, training is unavailable, or the server drains."""


class TrainingJobError(Exception):
    """A training job ended without succeeding (failed, cancelled or interrupted)."""

    def __init__(self, job: Any):
        self.job = job
        super().__init__(f"training job {job.id} ({job.name}) {job.state}: {job.error or ''}")


_BY_STATUS: dict[int, type[SwapserveError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    415: UnprocessableEntityError,
    422: UnprocessableEntityError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def error_from_response(response: httpx.Response) -> SwapserveError:
    status = response.status_code
    try:
        body: Any = response.json()
    except (ValueError, json.JSONDecodeError):
        body = {"error": {"message": response.text or response.reason_phrase}}
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        error = {"message": str(body)}
    cls = _BY_STATUS.get(status) or (InternalServerError if status >= 500 else SwapserveError)
    return cls(
        status,
        str(error.get("message") or ""),
        type=error.get("type"),
        param=error.get("param"),
        code=error.get("code"),
        body=body,
    )
