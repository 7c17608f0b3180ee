"""Frames as a browser-safe MP4 (PyAV): the one MP4 encoder of dfserve.

It sits in model/ so that both the service (server/video.py: the rollout's video, `dfserve
rollout -o x.mp4`) and the evaluation (model/evaluate.py: rollouts beside the environment's
frames) use it, and model/ never imports server/. A frame is a numpy uint8 array of shape
(H, W, 3), RGB. Bad input raises ValueError so that the routes can turn it into a 4xx.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from fractions import Fraction

import av
import numpy as np
from av.video.reformatter import Interpolation

_CRF = "16"  # frames are tiny (64x64), so near-lossless quality costs only a few kilobytes
# RGB -> yuv420p with AREA averages each 2x2 block for chroma, so pixel-art edges on the
# 2x2 grid keep their colour (swscale's default bilinear bleeds ~5 levels across them).
TO_YUV = Interpolation.AREA


def check_frame(frame: np.ndarray) -> np.ndarray:
    """The frame as an array, or ValueError unless it is uint8 (H, W, 3)."""
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame must be uint8 (H, W, 3) RGB, got {frame.dtype} {frame.shape}")
    return frame


# swscale converts RGB with the BT.601 matrix; say so, or players guess (often BT.709).
_MP4_OPTIONS = {"crf": _CRF, "preset": "veryfast", "x264-params": "colormatrix=smpte170m"}


def encode_mp4(frames: Sequence[np.ndarray], fps: int, scale: int = 1) -> bytes:
    """Encode RGB frames as a browser-safe MP4: H.264, yuv420p, even size, faststart."""
    return _encode_all(mp4_encoder(fps, scale), frames)


def mp4_encoder(fps: int, scale: int = 1) -> VideoEncoder:
    """encode_mp4 a frame at a time: the worker feeds each rollout's frames as they are made,
    so the finished MP4 costs only the encoder's flush, not a pass over every frame."""
    # libavformat's own +faststart reopens the output by file name, which an in-memory
    # buffer does not have, so the moov box is moved in Python instead.
    return VideoEncoder(fps, "mp4", "libx264", _MP4_OPTIONS, scale, finalize=_faststart)


def encode_video(frames: Sequence[np.ndarray], fps: int, container_format: str, codec: str,
                 options: Mapping[str, object], scale: int = 1) -> bytes:  # fmt: skip
    """RGB frames as a yuv420p video of `codec` in `container_format` (see VideoEncoder)."""
    return _encode_all(VideoEncoder(fps, container_format, codec, options, scale), frames)


def _encode_all(encoder: VideoEncoder, frames: Sequence[np.ndarray]) -> bytes:
    try:
        for frame in frames:
            encoder.add(frame)
        return encoder.finish()
    finally:
        encoder.close()


class VideoEncoder:
    """Frames in one at a time, the encoded file out at the end: a yuv420p video of `codec` in
    `container_format`, each frame scaled up `scale` times (nearest neighbour) and padded to
    an even size, one frame per 1/fps. Every frame must have the first one's shape."""

    def __init__(self, fps: int, container_format: str, codec: str,
                 options: Mapping[str, object], scale: int = 1,
                 finalize: Callable[[bytes], bytes] | None = None) -> None:  # fmt: skip
        if fps <= 0 or scale < 1:
            raise ValueError(f"fps must be > 0 and scale >= 1, got fps={fps} scale={scale}")
        self.fps, self.format, self.codec, self.scale = fps, container_format, codec, scale
        self.options = dict(options)
        self.finalize = finalize
        self.frames = 0
        self._shape: tuple[int, ...] | None = None
        self._buf = io.BytesIO()
        self._container: av.container.OutputContainer | None = None
        self._stream: av.VideoStream | None = None

    def add(self, frame: np.ndarray) -> None:
        f = check_frame(frame)
        if self._shape is None:
            self._open(f.shape)
        elif f.shape != self._shape:
            raise ValueError(f"frame {self.frames} has shape {f.shape}, frame 0 has "
                             f"{self._shape}")  # fmt: skip
        assert self._container is not None and self._stream is not None
        if self.scale > 1:  # nearest neighbour keeps the pixel-art look of small frames
            f = f.repeat(self.scale, axis=0).repeat(self.scale, axis=1)
        pad_h, pad_w = f.shape[0] % 2, f.shape[1] % 2
        if pad_h or pad_w:  # yuv420p subsamples chroma 2x2, so both sides must be even
            f = np.pad(f, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
        vf = vf.reformat(format="yuv420p", interpolation=TO_YUV)
        # One pts per frame in a 1/fps time base: constant rate, no drops or duplicates.
        vf.pts, vf.time_base = self.frames, Fraction(1, self.fps)
        self._container.mux(self._stream.encode(vf))
        self.frames += 1

    def finish(self) -> bytes:
        """The whole file; the encoder is closed after it."""
        if self._container is None or self._stream is None:
            raise ValueError("cannot encode an empty list of frames")
        self._container.mux(self._stream.encode(None))  # flush the encoder's lookahead
        self.close()
        data = self._buf.getvalue()
        return self.finalize(data) if self.finalize else data

    def close(self) -> None:
        """Release the codec (also for an abandoned video); idempotent."""
        if self._container is not None:
            self._container.close()
            self._container = None

    def _open(self, shape: tuple[int, ...]) -> None:
        self._shape = shape
        h, w = shape[0] * self.scale, shape[1] * self.scale
        self._container = av.open(self._buf, mode="w", format=self.format)
        stream = self._container.add_stream(self.codec, rate=self.fps)
        assert isinstance(stream, av.VideoStream), self.codec  # a video codec's stream
        stream.width, stream.height, stream.pix_fmt = w + w % 2, h + h % 2, "yuv420p"
        stream.codec_context.time_base = Fraction(1, self.fps)
        stream.options = dict(self.options)
        self._stream = stream


# ---------------------------------------------------------------------------- MP4 boxes


def mp4_boxes(data: bytes | bytearray, start: int, end: int
              ) -> Iterator[tuple[bytes, int, int, int]]:
    """Yield (type, box start, payload start, box end) for the ISO-BMFF boxes in [start, end)."""
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1:  # 64-bit "largesize" follows the type
            if pos + 16 > end:
                raise ValueError("truncated MP4 box header")
            (size,) = struct.unpack_from(">Q", data, pos + 8)
            header = 16
        elif size == 0:  # box extends to the end of its parent
            size = end - pos
        if size < header or pos + size > end:
            raise ValueError(f"corrupt MP4 box {kind!r} at offset {pos}")
        yield kind, pos, pos + header, pos + size
        pos += size


def _shift_chunk_offsets(moov: bytearray, start: int, end: int, at: int, shift: int) -> None:
    """Add `shift` to every stco/co64 chunk offset >= `at` inside moov[start:end], in place."""
    for kind, _, body, stop in mp4_boxes(moov, start, end):
        if kind in (b"trak", b"mdia", b"minf", b"stbl"):
            _shift_chunk_offsets(moov, body, stop, at, shift)
        elif kind in (b"stco", b"co64"):
            fmt = ">I" if kind == b"stco" else ">Q"
            width = struct.calcsize(fmt)
            (count,) = struct.unpack_from(">I", moov, body + 4)  # after version + flags
            for p in range(body + 8, body + 8 + count * width, width):
                (off,) = struct.unpack_from(fmt, moov, p)
                if off >= at:
                    struct.pack_into(fmt, moov, p, off + shift)


def _faststart(data: bytes) -> bytes:
    """Move the top-level 'moov' box in front of the first 'mdat', fixing chunk offsets."""
    top = list(mp4_boxes(data, 0, len(data)))
    kinds = [b[0] for b in top]
    if b"moov" not in kinds or b"mdat" not in kinds:
        raise ValueError("MP4 has no moov or no mdat box")
    i_moov, i_mdat = kinds.index(b"moov"), kinds.index(b"mdat")
    if i_moov < i_mdat:
        return data
    _, m_start, _, m_end = top[i_moov]
    moov = bytearray(data[m_start:m_end])
    insert_at = top[i_mdat][1]
    # Everything from insert_at on moves right by len(moov), media data included.
    _shift_chunk_offsets(moov, 8, len(moov), insert_at, len(moov))
    return data[:insert_at] + bytes(moov) + data[insert_at:m_start] + data[m_end:]
