"""JobSpec: what the queue carries for one job, from the API to the worker.

The API builds it once (`job_spec`), from a request checked by model.request.resolve exactly
as the worker will run it, and stores its JSON with the job (server/queue/); the worker
reads it back with `JobSpec.from_params` and turns it into the engine's request without
checking anything a second time. The context frames travel as what the model sees: trimmed,
at the model's resolution, one lossless PNG per frame (base64 in the JSON).
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, field_serializer, field_validator

from dfserve.model.config import BundleConfig, SamplingConfig
from dfserve.model.errors import FieldError
from dfserve.model.request import resolve, rollout_request
from dfserve.model.rollout import RolloutRequest
from dfserve.server import video
from dfserve.server.errors import queue_full_error
from dfserve.server.inputs import Context
from dfserve.server.queue import Job, Queue, QueueFull
from dfserve.server.schemas import RolloutParams, SessionStart, sampling_overrides

MAX_FPS = 120
SEED_RANGE = 2**32  # a seed drawn for a request that gives none


class JobSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str  # the bundle id
    context: list[bytes]  # one PNG per context frame, (R, R, 3) at the model's resolution
    context_actions: list[int] | None = None  # the actions that made the context frames
    actions: list[int]  # one per generated frame; a session's come one message at a time
    frames: int  # len(actions); 0 for a session
    sampling: SamplingConfig  # every setting, the model's defaults filled in
    seed: int  # drawn when the request gave none, so a re-run makes the same frames
    fps: int  # of the MP4
    notes: list[str] = []  # what the API changed on the way (model.request.ResolvedRequest)
    kind: Literal["rollout", "session"] = "rollout"  # stored by the queue (see to_params)

    @field_serializer("context")
    def _context_as_base64(self, frames: list[bytes]) -> list[str]:
        return [base64.b64encode(png).decode() for png in frames]

    @field_validator("context", mode="before")
    @classmethod
    def _context_from_base64(cls, frames: Any) -> Any:
        if not isinstance(frames, list):
            return frames
        return [base64.b64decode(f, validate=True) if isinstance(f, str) else f for f in frames]

    def to_params(self) -> dict[str, Any]:
        """The job's params as the queue stores them (JSON), less `kind`: the queue marks a
        session's itself (Queue.submit_session), which `enqueue` picks by kind."""
        return self.model_dump(mode="json", exclude={"kind"})

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> JobSpec:
        """A job's stored params; a FieldError naming the first field that does not fit."""
        try:
            return cls.model_validate(params)
        except ValidationError as e:
            first = e.errors(include_url=False)[0]
            raise FieldError(str(first["loc"][-1]) if first["loc"] else "params",
                             f"{first['msg']} (got {first['input']!r})"[:500]) from None

    def context_pixels(self) -> np.ndarray:
        """uint8 (K, R, R, 3)."""
        return np.stack([video.decode_image(png) for png in self.context])

    def request(self, config: BundleConfig) -> RolloutRequest:
        """The engine's request (a session's has no actions yet: the worker adds them)."""
        return rollout_request(config, self.context_pixels(), tuple(self.actions),
                               self.sampling, self.seed,
                               tuple(self.context_actions) if self.context_actions else None)


def job_spec(params: RolloutParams | SessionStart, model_id: str, config: BundleConfig,
             ctx: Context, max_frames: int | None) -> JobSpec:
    """The job a rollout request or a session's start message asks for, checked as the
    worker will run it (FieldError otherwise)."""
    overrides = sampling_overrides(params)
    seed = params.seed if params.seed is not None else secrets.randbelow(SEED_RANGE)
    context_actions = (params.context_actions if params.context_actions is not None
                       else ctx.context_actions)
    session = isinstance(params, SessionStart)
    actions: list[int | str] | None = None  # a session's come one message at a time, and
    frames: int | None = 1  # one frame stands in for them while the request is checked
    fps = config.data.fps
    if session and overrides["chunk_size"] is None:
        overrides["chunk_size"] = 1  # a session answers every action at once
    if isinstance(params, RolloutParams):
        actions = params.actions if params.actions is not None else ctx.actions
        frames, fps = params.frames, fps if params.fps is None else params.fps
    r = resolve(config, ctx.frames, actions, frames, overrides, seed, context_actions,
                max_frames)
    if not 1 <= fps <= MAX_FPS:
        raise FieldError("fps", f"{fps} is outside [1, {MAX_FPS}]")
    return JobSpec(
        model=model_id, context=[video.encode_png(f) for f in r.context],
        context_actions=list(r.context_actions) if r.context_actions else None,
        actions=[] if session else list(r.actions), frames=0 if session else len(r.actions),
        sampling=r.sampling, seed=r.seed, fps=fps, notes=[] if session else list(r.notes),
        kind="session" if session else "rollout")


def enqueue(queue: Queue, spec: JobSpec, owner: str | None,
            idempotency_key: str | None = None) -> Job:
    """Queue the job (a session's waits for a worker's batch slot like any job); 429 when the
    queue is full."""
    try:
        if spec.kind == "session":
            return queue.submit_session(spec.to_params(), owner)
        return queue.submit(spec.to_params(), spec.frames, owner=owner,
                            idempotency_key=idempotency_key)
    except QueueFull as e:
        raise queue_full_error(queue, e) from None


def shown_params(params: dict[str, Any], action_names: Sequence[str] = ()) -> dict[str, Any]:
    """A job's stored params as the client sees them: the context as a count, not pixels, the
    sampling settings inline, and actions by name when the model names them (the spec stores
    indices). Read from the stored JSON as it is, so that any job the queue holds shows."""
    view = {k: v for k, v in params.items() if k not in ("context", "sampling", "notes")}
    for key in ("actions", "context_actions"):
        if action_names and view.get(key):
            view[key] = [action_names[a] if 0 <= a < len(action_names) else a
                         for a in view[key]]  # fmt: skip
    return {**view, "context_frames": len(params.get("context", [])),
            **params.get("sampling", {})}


def job_notes(job: Job) -> list[str]:
    """The API's notes on the request, then the queue's on the job's runs."""
    return [*job.params.get("notes", []), *job.notes]
