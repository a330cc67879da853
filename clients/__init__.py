"""Python client for swapserve's API beyond inference (the `openai` SDK does inference):
adapters, training jobs, retrieval collections, A/B experiments, splits and feedback."""

from clients.errors import (
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    SwapserveError,
    TrainingJobError,
    UnprocessableEntityError,
)
from clients.swapserve import AsyncSwapserve, Swapserve

__all__ = [
    "AsyncSwapserve",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "InternalServerError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServiceUnavailableError",
    "Swapserve",
    "SwapserveError",
    "TrainingJobError",
    "UnprocessableEntityError",
]
