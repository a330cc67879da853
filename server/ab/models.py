"""Request and response bodies of the /ab routes: they live in server/schemas.py (shared
with clients/); re-exported here for the A/B code that imports them from this module."""

from server.schemas import (
    ARM_NAME_PATTERN as NAME_PATTERN,
)
from server.schemas import (
    ArmSpec,
    ExperimentList,
    ExperimentRequest,
    ExperimentStatus,
    FeedbackAck,
    FeedbackRequest,
    Question,
    Split,
    SplitArm,
    SplitList,
    SplitRequest,
)

__all__ = [
    "NAME_PATTERN",
    "ArmSpec",
    "ExperimentList",
    "ExperimentRequest",
    "ExperimentStatus",
    "FeedbackAck",
    "FeedbackRequest",
    "Question",
    "Split",
    "SplitArm",
    "SplitList",
    "SplitRequest",
]
