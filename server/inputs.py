"""Context input of a rollout request -> uint8 frames (K, R, R, 3) at the model's resolution.

Four sources, exactly one per request: `context` (a list of base64 PNG/JPEG, data URLs
accepted), `context_video` (base64 MP4 or any container PyAV reads), multipart files (images
and/or videos, in the order given) or `example` (a bundled example, which also brings its
actions). Every frame is center-cropped and resized with video.resize_frame. Errors are
FieldErrors naming the field (and the file), mapped to 422 by the API.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dfserve.model.bundle import Example
from dfserve.model.config import BundleConfig
from dfserve.model.errors import FieldError
from dfserve.model.frame_stack import max_context_frames
from dfserve.server import video

MAX_VIDEO_FRAMES = 256  # frames decoded from one context video (only the last ones are kept)
# pixels (frames x width x height) all of a request's context may decode to (the default of
# Settings.max_request_pixels): 128 frames of 1080p video fit, a GIF of 256 frames on a
# 2048x2048 canvas (6 KB of file) does not
MAX_REQUEST_PIXELS = 2**28
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".gif")


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
    max_request_pixels: int = MAX_REQUEST_PIXELS,
) -> Context:
    given = [name for name, v in (("context", context), ("context_video", context_video),
                                  ("example", example), ("files", files)) if v]  # fmt: skip
    sources = ["context", "context_video", "example", "files"]
    if len(given) != 1:
        found = f"got {given}" if given else "none given"
        raise FieldError("context", f"give exactly one context source ({found})", sources)
    r = config.network.resolution
    if example:
        known = examples()
        if example not in known:
            raise FieldError("example", f"{example!r} is not a bundled example", sorted(known))
        ex = known[example]
        frames = [video.resize_frame(f, r) for f in ex.context]
        return Context(np.stack(frames), list(ex.context_actions) or None,
                       list(ex.actions) or None)
    items: list[_Source] = []
    if context:
        for i, item in enumerate(context):
            if not isinstance(item, str):
                raise FieldError(f"context[{i}]", "must be a base64 string")
            items.append(_Source(f"context[{i}]", _b64(f"context[{i}]", item), False))
    elif context_video:
        items.append(_Source("context_video", _b64("context_video", context_video), True))
    else:
        items = [_Source(name, f.data, f.is_video)
                 for f, name in zip(files or [], _upload_names(files or []), strict=True)]
    keep = max_context_frames(config, chunk_size=1)  # the most any request can use
    frames = _decode(items, given[0], r, keep, max_pixels, max_request_pixels)
    if not frames:
        raise FieldError(given[0], "no frames")
    return Context(np.stack(frames), None, None)


@dataclass
class _Source:
    """One image or video of a request's context, with what its headers say."""

    name: str  # how errors name it: context[1], files[0] (a.png), context_video
    data: bytes
    is_video: bool
    width: int = 0
    height: int = 0
    frames: int = 1  # frames it may decode to (videos: the header's count, else the cap)

    def probe(self, max_pixels: int) -> None:
        try:
            if self.is_video:
                self.width, self.height, count = video.video_header(self.data)
                self.frames = min(count or MAX_VIDEO_FRAMES, MAX_VIDEO_FRAMES)
            else:
                self.width, self.height = video.image_size(self.data)
        except ValueError as e:
            raise FieldError(self.name, str(e)) from e
        if self.width * self.height > max_pixels:
            what = "video" if self.is_video else "image"
            raise FieldError(self.name, f"{what} is too large: {self.width}x{self.height} > "
                             f"{max_pixels} pixels")  # fmt: skip


def _decode(sources: list[_Source], field: str, r: int, keep: int, max_pixels: int,
            max_request_pixels: int) -> list[np.ndarray]:
    """The context frames at resolution r, decoding as little as the model needs.

    Every header is read first and the pixels that decoding would produce (frames x canvas,
    per source) are checked against the request's budget before any pixel is decoded: a
    few KB of GIF can describe gigabytes. Only the last `keep` frames can reach the model
    (model.request.resolve trims the rest), so images before them are never decoded and
    stand as blank frames there, and a video keeps only its last `keep` frames in memory."""
    for src in sources:
        src.probe(max_pixels)
    first_needed, count = len(sources), 0
    while first_needed > 0 and count < keep:  # images before this one are placeholders
        first_needed -= 1
        count += sources[first_needed].frames
    needed = [s for i, s in enumerate(sources) if i >= first_needed or s.is_video]
    pixels = sum(s.width * s.height * s.frames for s in needed)
    if pixels > max_request_pixels:
        raise FieldError(field, f"the context would decode to {pixels:,} pixels (frames x "
                         f"width x height over {len(needed)} files); this server decodes at "
                         f"most {max_request_pixels:,} per request")  # fmt: skip
    blank = np.zeros((r, r, 3), dtype=np.uint8)
    frames: list[np.ndarray] = []
    for i, src in enumerate(sources):
        if not src.is_video:
            image = _image(src.name, src.data, max_pixels) if i >= first_needed else None
            frames.append(blank if image is None else video.resize_frame(image, r))
            continue
        tail, decoded = _video(src.name, src.data, keep, max_pixels)
        frames += [blank] * (decoded - len(tail)) + [video.resize_frame(f, r) for f in tail]
    return frames


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
        raise FieldError(field, f"not valid base64: {e}") from e


def _image(field: str, data: bytes, max_pixels: int) -> np.ndarray:
    try:
        return video.decode_image(data, max_pixels=max_pixels)
    except ValueError as e:
        raise FieldError(field, str(e)) from e


def _video(field: str, data: bytes, keep: int, max_pixels: int
           ) -> tuple[list[np.ndarray], int]:
    try:
        return video.decode_video_tail(data, MAX_VIDEO_FRAMES, keep, max_pixels=max_pixels)
    except ValueError as e:
        raise FieldError(field, str(e)) from e
