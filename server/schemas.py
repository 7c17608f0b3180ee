"""Request and response models of the HTTP API (DESIGN §3).

Requests are strict: unknown fields and wrong JSON types are refused (422 naming the field)
rather than silently coerced, so a typo such as `stpes` never runs a default rollout.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from dfserve.model.config import sampling_types
from dfserve.server.queue import JobStatus

Action = int | str
# A job's status as the API shows it: the queue's JobStatus, plus "cancelling" for a running
# job whose cancel was asked for and has not taken effect yet (it stops within one row).
RolloutState = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]


STRICT = ConfigDict(extra="forbid", strict=True)

# One optional field per model.config.SamplingConfig field, of the same type (the names of a
# schedule, sampler or context-noise mode as Literal types): None keeps the model's default.
# Generated, so that a new sampling setting is declared once, in the dataclass.
SamplingOverrides = create_model(  # type: ignore[call-overload]
    "SamplingOverrides", __config__=STRICT,
    __doc__="Sampling settings of a request; each one left out is the model's default.",
    **{name: (kind | None, None) for name, kind in sampling_types().items()},
)


def sampling_overrides(params: BaseModel) -> dict[str, Any]:
    """The sampling fields of a request, None where the model's default applies."""
    return {name: getattr(params, name) for name in SamplingOverrides.model_fields}


class RolloutParams(SamplingOverrides):  # type: ignore[misc, valid-type]
    """POST /v1/rollouts body (or the `params` field of a multipart request)."""

    model_config = STRICT

    model: str | None = Field(None, description="model id; default: the server's default model")
    context: list[str] | None = Field(None, description="context frames, base64 PNG/JPEG")
    context_video: str | None = Field(None, description="context frames from a base64 video")
    example: str | None = Field(None, description="a bundled example (context + actions)")
    context_actions: list[Action] | None = Field(
        None, description="the actions that produced the context frames (names or indices)")
    actions: list[Action] | None = Field(
        None, description="one per generated frame (names or indices); fewer than `frames` "
                          "are repeated cyclically, more are cut to the first `frames`")
    frames: int | None = Field(None, description="frames to generate; default len(actions)")
    seed: int | None = Field(None, description="default: a random seed, stored with the job")
    fps: int | None = Field(None, description="frame rate of the MP4; default: the model's")


class SessionStart(SamplingOverrides):  # type: ignore[misc, valid-type]
    """The first message of WS /v1/sessions: {"type": "start", ...}. Like RolloutParams, less
    the per-rollout fields (actions, frames come one `action` message at a time)."""

    model_config = STRICT

    type: str = Field("start", pattern="^start$")
    model: str | None = Field(None, description="model id; default: the server's default model")
    context: list[str] | None = Field(None, description="context frames, base64 PNG/JPEG")
    context_video: str | None = Field(None, description="context frames from a base64 video")
    example: str | None = Field(None, description="a bundled example (its context)")
    context_actions: list[Action] | None = None
    chunk_size: int | None = Field(None, description="default 1: each action answered at once")
    seed: int | None = Field(None, description="default: a random seed")
    format: str = Field("jpeg", description="image format of frames: jpeg or png")


class Links(BaseModel):
    self: str
    video: str
    stream: str
    frames: str


class Progress(BaseModel):
    frames_done: int
    frames_total: int


class RolloutCreated(BaseModel):
    id: str
    status: JobStatus
    queue_position: int | None
    links: Links
    notes: list[str]


class JobState(BaseModel):
    """What every view of a job starts with (the schemas below; `links` stays last in each)."""

    id: str
    status: RolloutState
    progress: Progress
    queue_position: int | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None


class RolloutSummary(JobState):
    """One job of GET /v1/rollouts: what a list needs, without the parameters."""

    links: Links


class RolloutStatus(JobState):  # one job in full: GET /v1/rollouts/{id}
    worker: str | None
    params: dict[str, Any] = Field(description="the effective parameters, defaults filled in")
    notes: list[str]
    links: Links


class RolloutList(BaseModel):
    rollouts: list[RolloutSummary] = Field(description="newest first")
    next_cursor: str | None = Field(
        description="pass as ?cursor= for the next (older) page; null on the last page")


class ModelInfo(BaseModel):
    id: str
    default: bool
    resolution: int
    channels: int
    fps: int
    n_frames: int
    context_length: int
    max_context_frames: int
    max_rollout_frames: int
    actions: list[str] | None = Field(
        None, description="action names; absent for unconditional models (frames only)")
    architecture: str = Field("dit", description="the network: dit, or unet3d (imported)")
    schedules: list[str]
    samplers: list[str]
    defaults: dict[str, Any]
    examples: list[str]


class ModelList(BaseModel):
    default: str
    models: list[ModelInfo]


class ErrorDetail(BaseModel):
    field: str | None
    message: str
    accepted: Any = None


class ErrorBody(BaseModel):
    detail: ErrorDetail


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    ready: bool
    redis: bool
    workers: list[dict[str, Any]]
    reason: str | None = None
