import io
import struct
import zlib
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from dfserve.server.video import (
    VideoInfo,
    decode_image,
    decode_video,
    encode_jpeg,
    encode_mp4,
    encode_png,
    frames_to_uint8,
    probe_mp4,
    resize_frame,
)


def gradient_frames(n: int, h: int, w: int) -> list[np.ndarray]:
    """Smooth RGB gradients that drift with the frame index, so every frame is distinct."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = []
    for i in range(n):
        r = 40 + 160 * yy / max(h - 1, 1) + 3 * i
        g = 40 + 160 * xx / max(w - 1, 1)
        b = 220 - 8 * i + 0 * xx
        frames.append(np.stack([r, g, b], -1).clip(0, 255).astype(np.uint8))
    return frames


def mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ---------------------------------------------------------------------------- MP4


@pytest.mark.parametrize("n", [1, 12])
def test_mp4_round_trip_64(n: int) -> None:
    frames = gradient_frames(n, 64, 64)
    data = encode_mp4(frames, fps=8)
    assert probe_mp4(data) == VideoInfo("h264", "yuv420p", 64, 64, n, 8.0, faststart=True)
    out = decode_video(data)
    assert len(out) == n
    for i, (got, want) in enumerate(zip(out, frames, strict=True)):
        assert got.shape == (64, 64, 3) and got.dtype == np.uint8
        assert mae(got, want) < 3.0, f"frame {i}"


def test_mp4_keeps_every_frame_in_order() -> None:
    # Frames that differ strongly: a dropped or duplicated frame shifts the sequence.
    levels = [0, 200, 50, 250, 100, 150, 30, 220, 90]
    frames = [np.full((64, 64, 3), v, np.uint8) for v in levels]
    out = decode_video(encode_mp4(frames, fps=24))
    assert [round(float(f.mean()) / 10) for f in out] == [round(v / 10) for v in levels]


def test_mp4_pixel_art_edges_keep_their_colour() -> None:
    # 8x8 blocks of random colours, like upscaled Crafter tiles: chroma must not bleed.
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    frames = [b.repeat(8, 0).repeat(8, 1) for b in blocks]
    out = decode_video(encode_mp4(frames, fps=10))
    assert max(mae(a, b) for a, b in zip(out, frames, strict=True)) < 4.0


def test_mp4_odd_size_is_padded_to_even() -> None:
    frames = gradient_frames(7, 37, 63)
    data = encode_mp4(frames, fps=7)
    info = probe_mp4(data)
    assert (info.width, info.height, info.frames, info.fps) == (64, 38, 7, 7.0)
    assert info.codec == "h264" and info.pix_fmt == "yuv420p" and info.faststart
    out = decode_video(data)
    assert len(out) == 7 and out[0].shape == (38, 64, 3)
    for got, want in zip(out, frames, strict=True):
        assert mae(got[:37, :63], want) < 3.0
        # Edge replication: the padding repeats the last row / column.
        assert mae(got[37, :63], want[36]) < 4.0
        assert mae(got[:37, 63], want[:, 62]) < 4.0


def test_mp4_scale_is_nearest_neighbour() -> None:
    frames = gradient_frames(3, 64, 64)
    data = encode_mp4(frames, fps=10, scale=4)
    info = probe_mp4(data)
    assert (info.width, info.height, info.frames) == (256, 256, 3)
    out = decode_video(data)
    big = frames[0].repeat(4, 0).repeat(4, 1)
    assert mae(out[0], big) < 3.0


def test_mp4_scale_then_pad() -> None:
    # 3x scale of an odd size stays odd: 37*3=111, 21*3=63 -> padded to 112x64.
    info = probe_mp4(encode_mp4(gradient_frames(2, 21, 37), fps=5, scale=3))
    assert (info.width, info.height, info.frames) == (112, 64, 2)


def test_encode_mp4_rejects_bad_input() -> None:
    good = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="empty"):
        encode_mp4([], fps=8)
    with pytest.raises(ValueError, match="shape"):
        encode_mp4([good, np.zeros((32, 64, 3), np.uint8)], fps=8)
    with pytest.raises(ValueError, match="uint8"):
        encode_mp4([good.astype(np.float32)], fps=8)
    with pytest.raises(ValueError, match="RGB"):
        encode_mp4([np.zeros((64, 64, 4), np.uint8)], fps=8)
    with pytest.raises(ValueError, match="fps"):
        encode_mp4([good], fps=0)


def _mp4_without_faststart(n: int) -> bytes:
    # Plain libavformat output: moov written last, after mdat.
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        for i, f in enumerate(gradient_frames(n, 32, 32)):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts, vf.time_base = i, Fraction(1, 10)
            c.mux(s.encode(vf))
        c.mux(s.encode(None))
    return buf.getvalue()


def test_probe_reports_moov_after_mdat() -> None:
    data = _mp4_without_faststart(5)
    assert data.index(b"mdat") < data.index(b"moov")
    info = probe_mp4(data)
    assert not info.faststart and info.frames == 5 and info.fps == 10.0


def test_faststart_output_has_moov_first() -> None:
    data = encode_mp4(gradient_frames(30, 64, 64), fps=15)
    assert data[4:8] == b"ftyp"
    assert data.index(b"moov") < data.index(b"mdat")


def test_decode_video_other_containers_and_max_frames() -> None:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="matroska") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 48, 32, "yuv420p"
        s.options = {"qscale": "2"}
        for i, f in enumerate(gradient_frames(6, 32, 48)):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts, vf.time_base = i, Fraction(1, 10)
            c.mux(s.encode(vf))
        c.mux(s.encode(None))
    out = decode_video(buf.getvalue())
    assert len(out) == 6 and out[0].shape == (32, 48, 3)
    assert mae(out[2], gradient_frames(6, 32, 48)[2]) < 6.0
    assert len(decode_video(buf.getvalue(), max_frames=4)) == 4
    assert decode_video(buf.getvalue(), max_frames=0) == []


def test_decode_video_rejects_non_video() -> None:
    mp4 = encode_mp4(gradient_frames(3, 64, 64), fps=8)
    for data in [b"", b"garbage" * 100, mp4[:40], mp4[: len(mp4) // 2]]:
        with pytest.raises(ValueError, match="not a decodable video"):
            decode_video(data)
    with pytest.raises(ValueError, match="max_frames"):
        decode_video(mp4, max_frames=-1)


def test_decode_video_rejects_oversized_video() -> None:
    data = encode_mp4(gradient_frames(2, 64, 64), fps=8)
    with pytest.raises(ValueError, match="too large"):
        decode_video(data, max_pixels=64 * 63)


def test_probe_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        probe_mp4(b"\x00\x00\x00\x10garbagegarbage")
    with pytest.raises(ValueError):
        probe_mp4(b"not an mp4 at all, just some text")


# ---------------------------------------------------------------------------- images


def test_png_round_trip_is_exact() -> None:
    frame = np.random.default_rng(1).integers(0, 256, (37, 63, 3), dtype=np.uint8)
    data = encode_png(frame)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    np.testing.assert_array_equal(decode_image(data), frame)


def test_jpeg_round_trip_is_close() -> None:
    frame = gradient_frames(1, 64, 64)[0]
    data = encode_jpeg(frame)
    assert data.startswith(b"\xff\xd8")
    out = decode_image(data)
    assert out.shape == (64, 64, 3) and mae(out, frame) < 2.0
    assert len(encode_jpeg(frame, quality=20)) < len(data)
    with pytest.raises(ValueError, match="quality"):
        encode_jpeg(frame, quality=0)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_decode_image_converts_to_rgb(mode: str) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), (10, 120, 230)).convert(mode).save(buf, format="PNG")
    out = decode_image(buf.getvalue())
    assert out.shape == (10, 20, 3) and out.dtype == np.uint8


def test_decode_image_applies_exif_orientation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), (200, 0, 0)).save(buf, format="JPEG", exif=exif)
    assert decode_image(buf.getvalue()).shape == (20, 10, 3)


def test_decode_image_rejects_garbage() -> None:
    noise = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    png, jpeg = encode_png(noise), encode_jpeg(noise)
    for data in [b"", b"garbage" * 50, png[:20], png[: len(png) // 2], jpeg[: len(jpeg) // 2]]:
        with pytest.raises(ValueError, match="not a decodable image"):
            decode_image(data)


def test_decode_image_rejects_large_images() -> None:
    data = encode_png(np.zeros((100, 100, 3), np.uint8))
    assert decode_image(data, max_pixels=100 * 100).shape == (100, 100, 3)
    with pytest.raises(ValueError, match="too large"):
        decode_image(data, max_pixels=100 * 99)


def _png_header_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims a huge size: decoding it would allocate gigabytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = b"IDAT" + zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
        + struct.pack(">I", len(idat) - 4) + idat + struct.pack(">I", zlib.crc32(idat))
    )  # fmt: skip


@pytest.mark.parametrize("side", [5000, 100_000])
def test_decode_image_checks_size_before_decoding(side: int) -> None:
    with pytest.raises(ValueError, match="too large"):
        decode_image(_png_header_claiming(side, side))


# ---------------------------------------------------------------------------- resize


def test_resize_center_crops_then_scales() -> None:
    # 200 wide, 100 high: the center square is columns 50..149, which are blue.
    frame = np.zeros((100, 200, 3), np.uint8)
    frame[:, :50] = (255, 0, 0)
    frame[:, 150:] = (255, 0, 0)
    frame[:, 50:150] = (0, 0, 255)
    out = resize_frame(frame, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.broadcast_to(np.array([0, 0, 255], np.uint8), out.shape))


def test_resize_tall_image_and_upscale() -> None:
    frame = gradient_frames(1, 300, 80)[0]
    assert resize_frame(frame, 64).shape == (64, 64, 3)
    small = np.full((16, 16, 3), 77, np.uint8)
    np.testing.assert_array_equal(resize_frame(small, 64), np.full((64, 64, 3), 77, np.uint8))
    same = gradient_frames(1, 64, 64)[0]
    np.testing.assert_array_equal(resize_frame(same, 64), same)


def test_resize_downscale_averages_instead_of_aliasing() -> None:
    # A 1-pixel checkerboard shrunk 8x must come out mid-grey, not black or white.
    yy, xx = np.mgrid[0:512, 0:512]
    board = np.repeat((((yy + xx) % 2) * 255).astype(np.uint8)[..., None], 3, axis=2)
    out = resize_frame(board, 64)
    assert abs(float(out.mean()) - 127.5) < 3 and out.std() < 3


# ---------------------------------------------------------------------------- model output


def test_frames_to_uint8_values_and_layout() -> None:
    x = np.zeros((2, 3, 4, 5), np.float32)  # (B, C, H, W)
    x[:, 0] = -1.0
    x[:, 1] = 0.0
    x[:, 2] = 1.0
    out = frames_to_uint8(x)
    assert out.shape == (2, 4, 5, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, 0, 0], [0, 128, 255])  # 0 -> 127.5 rounds half up


def test_frames_to_uint8_rounds_and_clips() -> None:
    vals = np.array([-5.0, -1.0, -0.999, 1 / 127.5 - 1, 0.5, 0.996, 1.0, 7.0, np.nan], np.float32)
    out = frames_to_uint8(vals.reshape(1, 1, -1)).ravel()  # (C=1, H=1, W=n)
    # -0.999 -> 0.1275 -> 0; 1/127.5-1 -> 1; 0.5 -> 191.25 -> 191; 0.996 -> 254.49 -> 254
    np.testing.assert_array_equal(out, [0, 0, 0, 1, 191, 254, 255, 255, 128])


def test_frames_to_uint8_accepts_torch() -> None:
    t = torch.linspace(-1, 1, 3 * 2 * 2, requires_grad=True).reshape(3, 2, 2)
    out = frames_to_uint8(t * 1.0)  # a tensor that still needs grad
    assert out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out, frames_to_uint8(t.detach().numpy()))
    half = torch.tensor([-1.0, 0.0, 0.5, 1.0], dtype=torch.bfloat16).reshape(1, 1, 4)
    np.testing.assert_array_equal(frames_to_uint8(half).ravel(), [0, 128, 191, 255])
    with pytest.raises(ValueError, match="C, H, W"):
        frames_to_uint8(np.zeros((4, 4), np.float32))
