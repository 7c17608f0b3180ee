"""Context input of a rollout request -> uint8 frames (K, R, R, 3) at the model's resolution.

Four sources, exactly one per request: `context` (a list of base64 PNG/JPEG, data URLs
accepted), `context_video` (base64 MP4 or any container PyAV reads), multipart files (images
and/or videos, in the order given) or `example` (a bundled example, which also brings its
actions). Every frame is center-cropped and resized with video.resize_frame. Errors are
`InputError`s (ValueErrors) naming the field, mapped to 422 by the API.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.bundle import Example
from model.config import BundleConfig
from server import video

MAX_VIDEO_FRAMES = 256  # frames decoded from one context video (only the last ones are kept)
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".gif")


class InputError(ValueError):
    """A bad input, with the field it came from and (when a fixed set exists) accepted values."""

    def __init__(self, field: str, message: str, accepted: Any = None) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.accepted = field, message, accepted


@dataclass(frozen=True)
class Upload:
    """One multipart file, with the form field it came in (named in errors)."""

    filename: str
    content_type: str
    data: bytes
    field: str = "files"  # "files" (images and/or videos), "context" (images), "context_video"

    @property
    def is_video(self) -> bool:
        if self.field != "files":
            return self.field == "context_video"
        return self.content_type.startswith("video/") or self.filename.lower().endswith(
            VIDEO_SUFFIXES)


@dataclass(frozen=True)
class Context:
    frames: np.ndarray  # (K, R, R, 3) uint8
    context_actions: list[int | str] | None  # from the example, unless the client gave some
    actions: list[int | str] | None


def decode_context(
    config: BundleConfig,
    *,
    context: list[str] | None = None,
    context_video: str | None = None,
    example: str | None = None,
    files: list[Upload] | None = None,
    examples: Callable[[], dict[str, Example]] = dict,
    max_pixels: int = video.MAX_PIXELS,
) -> Context:
    given = [name for name, v in (("context", context), ("context_video", context_video),
                                  ("example", example), ("files", files)) if v]  # fmt: skip
    sources = ["context", "context_video", "example", "files"]
    if len(given) != 1:
        found = f"got {given}" if given else "none given"
        raise InputError("context", f"give exactly one context source ({found})", sources)
    r = config.network.resolution
    if example:
        known = examples()
        if example not in known:
            raise InputError("example", f"{example!r} is not a bundled example", sorted(known))
        ex = known[example]
        frames = [video.resize_frame(f, r) for f in ex.context]
        return Context(np.stack(frames), list(ex.context_actions) or None,
                       list(ex.actions) or None)
    raw: list[np.ndarray] = []
    if context:
        for i, item in enumerate(context):
            if not isinstance(item, str):
                raise InputError(f"context[{i}]", "must be a base64 string")
            raw.append(_image(f"context[{i}]", _b64(f"context[{i}]", item), max_pixels))
    elif context_video:
        raw = _video("context_video", _b64("context_video", context_video), max_pixels)
    else:
        for f, name in zip(files or [], _upload_names(files or []), strict=True):
            if f.is_video:
                raw += _video(name, f.data, max_pixels)
            else:
                raw.append(_image(name, f.data, max_pixels))
    if not raw:
        raise InputError(given[0], "no frames")
    return Context(np.stack([video.resize_frame(f, r) for f in raw]), None, None)


def _upload_names(files: list[Upload]) -> list[str]:
    """How errors name each file: its form field, its index among that field's files and its
    file name, e.g. "files[1] (b.png)" or "context_video (clip.mp4)"."""
    seen: dict[str, int] = {}
    names = []
    for f in files:
        i = seen[f.field] = seen.get(f.field, -1) + 1
        name = f.field if f.field == "context_video" else f"{f.field}[{i}]"
        names.append(f"{name} ({f.filename})" if f.filename else name)
    return names


def _b64(field: str, text: str) -> bytes:
    if text.startswith("data:"):  # data:image/png;base64,....
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(field, f"not valid base64: {e}") from e


def _image(field: str, data: bytes, max_pixels: int) -> np.ndarray:
    try:
        return video.decode_image(data, max_pixels=max_pixels)
    except ValueError as e:
        raise InputError(field, str(e)) from e


def _video(field: str, data: bytes, max_pixels: int) -> list[np.ndarray]:
    try:
        return video.decode_video(data, MAX_VIDEO_FRAMES, max_pixels=max_pixels)
    except ValueError as e:
        raise InputError(field, str(e)) from e


def encode_context(frames: np.ndarray) -> list[str]:
    """uint8 (K, R, R, 3) -> base64 PNGs (how a job's context is stored in the queue)."""
    return [base64.b64encode(video.encode_png(f)).decode() for f in frames]


def decode_stored_context(items: list[str]) -> np.ndarray:
    """The inverse of encode_context (the worker's side)."""
    return np.stack([video.decode_image(base64.b64decode(s)) for s in items])
