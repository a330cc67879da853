"""Request and response bodies of the /ab routes.

Unlike the OpenAI-mirrored models these refuse unknown fields: a typo such as `arm` for
`arms` would otherwise silently run the default arms.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Question(Strict):
    id: str | None = Field(None, description="Defaults to q<position>.")
    question: str = Field(min_length=1, description="Sent as the user message.")
    references: list[str] = Field(
        min_length=1, description="Acceptable answers; each score is the best over them."
    )
    doc_id: str | None = Field(
        None,
        description="The document that holds the answer (the RAFT builder's oracle); an "
        "experiment keeps it with the question and reports whether retrieval found it.",
    )


class ArmSpec(Strict):
    name: str = Field(pattern=NAME_PATTERN, description="Shown in the report.")
    model: str = Field(min_length=1, description="The base id or an adapter name.")
    rag: dict[str, Any] | None = Field(
        None, description="Passed as the chat request's `rag` field, e.g. {collection}."
    )
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy.")
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="Unset: the experiment's max_tokens, else the longest reference in tokens "
        "+ 8 (at most 256 and the server's default).",
    )
    stop: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, max_length=4, description="Stop sequences, as in a chat request (up to 4)."
    )


class ExperimentRequest(Strict):
    name: str | None = None
    questions: list[Question] = Field(min_length=1)
    arms: list[ArmSpec] = Field(
        default_factory=list,
        description="Unset = base, base+rag, adapter, adapter+rag from `adapter`/`collection`.",
    )
    adapter: str | None = Field(None, description="For the default arms.")
    collection: str | None = Field(None, description="For the default arms.")
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="Default for arms that set none; unset: the longest reference in tokens + 8 "
        "(at most 256 and the server's default).",
    )
    concurrency: int = Field(
        4, ge=1, le=64, description="Questions in flight; every arm of a question runs at once."
    )
    seed: int = Field(0, description="Seeds sampling and the bootstrap.")


class ExperimentStatus(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["ab.experiment"] = "ab.experiment"
    name: str | None
    status: Literal["running", "completed", "failed", "cancelled", "interrupted"]
    created: int
    finished: int | None = None
    progress: dict[str, Any]
    arms: list[ArmSpec]
    error: str | None = None
    summary: dict[str, Any] | None = None
    questions: list[dict[str, Any]] | None = None


class ExperimentList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ExperimentStatus]


class SplitArm(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    model: str = Field(min_length=1)
    weight: float = Field(1.0, ge=0.0, description="Relative share of the traffic.")
    rag: dict[str, Any] | None = None


class SplitRequest(Strict):
    name: str = Field(pattern=NAME_PATTERN, description="Clients send model `ab:<name>`.")
    arms: list[SplitArm] = Field(min_length=1)
    replace: bool = False


class Split(BaseModel):
    object: Literal["ab.split"] = "ab.split"
    name: str
    model: str
    arms: list[SplitArm]
    created: int
    counts: dict[str, int] = Field(default_factory=dict, description="Responses per arm.")


class SplitList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Split]


class FeedbackRequest(Strict):
    response_id: str = Field(min_length=1)
    rating: Literal[-1, 1] | None = None
    preferred_over: str | None = Field(
        None, description="Another response id, to the same prompt, that this one beat."
    )


class FeedbackAck(BaseModel):
    object: Literal["ab.feedback"] = "ab.feedback"
    response_id: str
    split: str
    arm: str
