"""Image and video encoding/decoding for the service (PyAV + Pillow).

Every function here is pure: bytes in, numpy out or the reverse. A frame is a numpy uint8
array of shape (H, W, 3), RGB. Model output (float, [-1, 1], channels first) is brought to
that form by `frames_to_uint8`. Undecodable or oversized input raises ValueError so that the
routes can turn it into a 4xx. The MP4 encoder itself is model/media.py's (shared with the
evaluation); `encode_mp4` here is that one.
"""

from __future__ import annotations

import collections
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import av
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dfserve.model.media import check_frame, encode_video, mp4_boxes
from dfserve.model.media import (
    encode_mp4 as encode_mp4,  # re-exported: the service's video.encode_mp4
)

if TYPE_CHECKING:
    import torch

MAX_PIXELS = 4096 * 4096  # default ceiling for user images and videos (decompression bombs)


@dataclass(frozen=True)
class VideoInfo:
    codec: str  # e.g. "h264"
    pix_fmt: str  # e.g. "yuv420p"
    width: int
    height: int
    frames: int
    fps: float
    faststart: bool  # 'moov' precedes 'mdat': the browser can start playing before the end


# ---------------------------------------------------------------------------- video


def encode_webm(frames: Sequence[np.ndarray], fps: int) -> bytes:
    """Encode RGB frames as WebM: VP9, yuv420p, even size (padded like encode_mp4)."""
    return encode_video(frames, fps, "webm", "libvpx-vp9", {"crf": "20", "b:v": "0"})  # CQ


def encode_gif(frames: Sequence[np.ndarray], fps: int) -> bytes:
    """Encode RGB frames as an endlessly looping GIF (a palette of up to 256 colours each)."""
    if len(frames) == 0 or fps <= 0:
        raise ValueError(f"need frames and fps > 0, got {len(frames)} frames at fps={fps}")
    images = [Image.fromarray(check_frame(f)) for f in frames]
    buf = io.BytesIO()
    # GIF delays are in hundredths of a second; Pillow rounds the millisecond duration.
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:],
                   duration=round(1000 / fps), loop=0, optimize=False)
    return buf.getvalue()


def _reason(e: Exception) -> str:
    # FFmpegError's str() ends in the pseudo file name "<none>"; strerror alone reads better.
    return str(getattr(e, "strerror", None) or e)


def _open(data: bytes) -> av.container.InputContainer:
    try:
        return av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, UnicodeDecodeError) as e:
        raise ValueError(f"input is not a decodable video: {_reason(e)}") from e


def video_header(data: bytes) -> tuple[int, int, int | None]:
    """Width, height and frame count (None when the container does not say) of the first
    video stream, from the headers alone: nothing is decoded."""
    with _open(data) as container:
        if not container.streams.video:
            raise ValueError("input is not a decodable video: it has no video stream")
        stream = container.streams.video[0]
        return stream.width, stream.height, stream.frames or None


def image_size(data: bytes) -> tuple[int, int]:
    """Width and height of an image from its header alone (no pixels decompressed)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except UnidentifiedImageError as e:
        raise ValueError("input is not a decodable image: unknown or corrupt format") from e
    except (OSError, SyntaxError) as e:
        raise ValueError(f"input is not a decodable image: {e}") from e


def decode_video(
    data: bytes, max_frames: int | None = None, *, max_pixels: int = MAX_PIXELS
) -> list[np.ndarray]:
    """Decode the first video stream of any container/codec PyAV knows to RGB uint8 frames."""
    return decode_video_tail(data, max_frames, None, max_pixels=max_pixels)[0]


def decode_video_tail(
    data: bytes, max_frames: int | None, keep_last: int | None, *, max_pixels: int = MAX_PIXELS
) -> tuple[list[np.ndarray], int]:
    """Decode up to max_frames frames but keep only the last keep_last (memory stays at
    keep_last frames however long the video); returns them and how many were decoded."""
    if max_frames is not None and max_frames < 0:
        raise ValueError(f"max_frames must be >= 0, got {max_frames}")
    frames: collections.deque[np.ndarray] = collections.deque(maxlen=keep_last)
    decoded = 0
    with _open(data) as container:
        if not container.streams.video:
            raise ValueError("input is not a decodable video: it has no video stream")
        stream = container.streams.video[0]
        if stream.width * stream.height > max_pixels:
            raise ValueError(
                f"video is too large: {stream.width}x{stream.height} > {max_pixels} pixels"
            )
        try:
            for frame in container.decode(stream):
                if max_frames is not None and decoded >= max_frames:
                    break
                frames.append(frame.to_ndarray(format="rgb24"))
                decoded += 1
        except av.FFmpegError as e:
            if not decoded:  # a truncated tail is tolerated, a stream with no picture is not
                raise ValueError(f"input is not a decodable video: {_reason(e)}") from e
    if not decoded and max_frames != 0:
        raise ValueError("input is not a decodable video: no frames could be decoded")
    return list(frames), decoded


def probe_mp4(data: bytes) -> VideoInfo:
    """Describe an MP4: codec, pixel format, size, frame count, rate and box order."""
    try:
        kinds = [kind for kind, *_ in mp4_boxes(data, 0, len(data))]
    except ValueError as e:
        raise ValueError(f"input is not an MP4: {e}") from e
    if b"moov" not in kinds or b"mdat" not in kinds:
        raise ValueError("input is not an MP4: it has no moov or no mdat box")
    with _open(data) as container:
        if not container.streams.video:
            raise ValueError("input is not a decodable video: it has no video stream")
        stream = container.streams.video[0]
        # Count packets rather than trust the header's nb_frames, which some muxers omit.
        frames = sum(1 for p in container.demux(stream) if p.size)
        rate = stream.average_rate or stream.guessed_rate or 0
        return VideoInfo(
            codec=stream.codec_context.name,
            pix_fmt=stream.codec_context.pix_fmt or "",
            width=stream.width,
            height=stream.height,
            frames=frames,
            fps=float(rate),
            faststart=kinds.index(b"moov") < kinds.index(b"mdat"),
        )


# ---------------------------------------------------------------------------- images


def encode_png(frame: np.ndarray) -> bytes:
    """Lossless PNG of one RGB frame."""
    buf = io.BytesIO()
    Image.fromarray(check_frame(frame), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    """JPEG of one RGB frame (used for the live stream, where size matters more than bits)."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    buf = io.BytesIO()
    Image.fromarray(check_frame(frame), mode="RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode any image Pillow reads to RGB uint8 (H, W, 3), refusing oversized images."""
    try:
        # Image.open reads only the header, so the size check below runs before any pixels
        # are decompressed. Pillow's own bomb check fires only far above our limit.
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ValueError(f"image is too large: {w}x{h} > {max_pixels} pixels")
            upright = ImageOps.exif_transpose(im)  # phone photos store rotation in EXIF
            return np.asarray(upright.convert("RGB"), dtype=np.uint8).copy()
    except Image.DecompressionBombError as e:
        raise ValueError(f"image is too large: {e}") from e
    except UnidentifiedImageError as e:
        raise ValueError("input is not a decodable image: unknown or corrupt format") from e
    except (OSError, SyntaxError) as e:
        raise ValueError(f"input is not a decodable image: {e}") from e


def resize_frame(frame: np.ndarray, size: int) -> np.ndarray:
    """Center-crop to a square, then resize to size x size (bicubic, antialiased)."""
    frame = check_frame(frame)
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    h, w = frame.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    square = frame[top : top + s, left : left + s]
    if s == size:
        return square.copy()
    # Pillow widens the bicubic kernel by the scale factor when shrinking, so large
    # downscales average over the whole footprint instead of aliasing.
    im = Image.fromarray(np.ascontiguousarray(square), mode="RGB")
    return np.asarray(im.resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)


def frames_to_uint8(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Map floats in [-1, 1] shaped (..., C, H, W) to uint8 (..., H, W, C), rounded, clipped."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch in the API process
        x = x.detach().float().cpu().numpy()
    a = np.asarray(x, dtype=np.float32)
    if a.ndim < 3:
        raise ValueError(f"expected (..., C, H, W), got shape {a.shape}")
    a = np.nan_to_num(a, nan=0.0)  # a diverged sample shows as gray, not as garbage
    # Round half up: -1 -> 0, 0 -> 128, 1 -> 255.
    a = np.floor(np.clip((a + 1.0) * 127.5, 0.0, 255.0) + 0.5)
    return np.moveaxis(a.astype(np.uint8), -3, -1)  # (..., C, H, W) -> (..., H, W, C)
