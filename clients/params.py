"""What a rollout or a session asks for: the keyword arguments of `rollout()` and `session()`,
typed, and the JSON body they become (POST /v1/rollouts, a session's `start` message)."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict, Unpack

from dfserve.clients.images import encode_context

Action = str | int  # an action's name or its index in the model's list


class SessionParams(TypedDict, total=False):
    """Where play starts and how it samples; None (or leaving one out) takes the server's
    default. Context is one of `context` (images: PIL, uint8 arrays, paths or bytes, or a
    (K, H, W, 3) array), `context_video` (a path or the bytes of a video) or `example`."""

    model: str | None
    context: Any
    context_video: str | Path | bytes | None
    example: str | None
    context_actions: Sequence[Action] | None
    schedule: str | None
    sampler: str | None
    steps: int | None
    eta: float | None
    uncertainty_scale: float | None
    chunk_size: int | None
    guidance: float | None
    context_noise: int | None
    context_noise_mode: str | None
    seed: int | None


class RolloutParams(SessionParams, total=False):
    """A session's parameters plus what a rollout knows up front: its actions (one per frame,
    repeated cyclically when fewer), how many frames, and the MP4's frame rate."""

    actions: Sequence[Action] | None
    frames: int | None
    fps: int | None


def rollout_body(**params: Unpack[RolloutParams]) -> dict[str, Any]:
    """The JSON body of POST /v1/rollouts (and of a session's start message)."""
    body: dict[str, Any] = dict(params)
    if body.get("context") is not None:
        body["context"] = encode_context(body["context"])
    video = body.get("context_video")
    if video is not None:
        data = video if isinstance(video, bytes) else Path(video).read_bytes()
        body["context_video"] = base64.b64encode(data).decode()
    return {k: v for k, v in body.items() if v is not None}
