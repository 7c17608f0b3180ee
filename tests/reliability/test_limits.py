"""Backpressure and input limits: a full queue answers 429 with Retry-After, an oversized
body 413 (by Content-Length or while streaming), and every size limit of a request (frames,
steps, context frames, image pixels) a 422 naming the field. In-process, embedded queue."""

from __future__ import annotations

import base64
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import numpy as np
import pytest
from fastapi.testclient import TestClient

from dfserve.server import video
from dfserve.server.app import create_app
from dfserve.server.queue import Queue
from dfserve.server.settings import Settings


def png_b64(size: int, seed: int = 0) -> str:
    frame = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return base64.b64encode(video.encode_png(frame)).decode()


@pytest.fixture
def client(tiny_bundle_dir: Path) -> Iterator[TestClient]:
    s = Settings(model=str(tiny_bundle_dir), redis_prefix=f"lim-{uuid.uuid4().hex[:8]}",
                 max_queued=2, max_body_bytes=64 * 1024, max_frames=50, max_steps=20,
                 max_context_frames=3, max_image_pixels=24 * 24)
    queue = Queue(fakeredis.FakeRedis(server=fakeredis.FakeServer()), **s.queue_options())
    with TestClient(create_app(s, queue)) as c:
        yield c


LIMITS: list[tuple[dict[str, Any], str, str]] = [
    ({"frames": 51}, "frames", "50"),
    ({"steps": 21}, "steps", "20"),
    ({"example": None, "context": [png_b64(16, i) for i in range(4)]}, "context", "at most 3"),
    ({"example": None, "context": [png_b64(32)]}, "context[0]", "pixels"),
]


@pytest.mark.parametrize(("body", "field", "says"), LIMITS, ids=[f for _, f, _ in LIMITS])
def test_size_limits_are_422_naming_the_field(client: TestClient, body: dict[str, Any],
                                              field: str, says: str) -> None:
    r = client.post("/v1/rollouts", json={"example": "random", **body})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail["field"] == field and says in detail["message"], detail


def test_context_file_count_limit(client: TestClient) -> None:
    files = [("files", (f"{i}.png", base64.b64decode(png_b64(16, i)), "image/png"))
             for i in range(4)]  # fmt: skip
    r = client.post("/v1/rollouts", files=files, data={"params": "{}"})
    assert r.status_code == 422 and r.json()["detail"]["field"] == "files", r.text
    r = client.post("/v1/rollouts", files=files[:3], data={"params": '{"steps": 20}'})
    assert r.status_code == 202, r.text  # at the limits is fine


def test_body_limit_is_413(client: TestClient) -> None:
    big = {"example": None, "context": ["A" * (70 * 1024)]}
    r = client.post("/v1/rollouts", json=big)
    assert r.status_code == 413 and "65536" in r.json()["detail"]["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while it streams in
        yield b'{"context": ["'
        for _ in range(80):
            yield b"A" * 1024
        yield b'"]}'

    r = client.post("/v1/rollouts", content=chunks(),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text


def test_full_queue_is_429_with_retry_after(client: TestClient) -> None:
    for _ in range(2):
        assert client.post("/v1/rollouts", json={"example": "random"}).status_code == 202
    r = client.post("/v1/rollouts", json={"example": "random"})
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    assert "queue is full" in r.json()["detail"]["message"]


def test_retry_after_reflects_the_running_jobs_pace(client: TestClient) -> None:
    """With the queue full, Retry-After says when the soonest running job should end at its
    pace so far: here 1 of 4 frames in 30 s, so about 90 s (issue 13: it was always 5)."""
    queue: Queue = client.app.state.queue  # type: ignore[attr-defined]
    running = queue.submit({"model": "tiny"}, 4)
    (claimed,) = queue.claim("pace-worker", 1)
    assert queue.start(claimed, "pace-worker")
    queue.publish_frame(running.id, 0, b"png")
    queue.redis.hset(queue.keys.job(running.id), "started_at", repr(time.time() - 30))
    queue.heartbeat("pace-worker", {"warmed_up": True, "jobs": [running.id]}, 600)
    for _ in range(2):
        assert client.post("/v1/rollouts", json={"example": "random"}).status_code == 202
    r = client.post("/v1/rollouts", json={"example": "random"})
    assert r.status_code == 429, r.text
    assert 80 <= int(r.headers["retry-after"]) <= 100, r.headers


# --- the request's pixel budget (issue 13) ------------------------------------------------


def gif_bomb(canvas: int = 2048, frames: int = 256) -> bytes:
    """A GIF of `frames` 1x1-pixel images on a canvas x canvas screen: a few KB of file that
    decoders expand to `frames` full canvases."""
    lzw_one_pixel = bytes([2, 2, 0x44, 0x01, 0])  # min code size 2: clear, 0, end; then end
    image = (b"\x2c" + struct.pack("<HHHH", 0, 0, 1, 1) + b"\x00" + lzw_one_pixel)
    delay = b"\x21\xf9\x04\x00\x01\x00\x00\x00"  # graphic control: 10 ms per frame
    header = b"GIF89a" + struct.pack("<HH", canvas, canvas) + b"\x80\x00\x00"
    palette = b"\x00\x00\x00\xff\xff\xff"
    return header + palette + (delay + image) * frames + b"\x3b"


@pytest.fixture
def budget_client(tiny_bundle_dir: Path) -> Iterator[TestClient]:
    s = Settings(model=str(tiny_bundle_dir), redis_prefix=f"px-{uuid.uuid4().hex[:8]}",
                 max_image_pixels=64 * 64, max_request_pixels=3 * 64 * 64)
    queue = Queue(fakeredis.FakeRedis(server=fakeredis.FakeServer()), **s.queue_options())
    with TestClient(create_app(s, queue)) as c:
        yield c


@pytest.fixture
def default_client(tiny_bundle_dir: Path) -> Iterator[TestClient]:
    s = Settings(model=str(tiny_bundle_dir), redis_prefix=f"bomb-{uuid.uuid4().hex[:8]}")
    queue = Queue(fakeredis.FakeRedis(server=fakeredis.FakeServer()), **s.queue_options())
    with TestClient(create_app(s, queue)) as c:
        yield c


def test_a_gif_bomb_is_refused_from_its_headers(default_client: TestClient,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Each frame of the bomb is within the per-image limit (2048^2 < 4096^2); all 256 of
    them are not within the request's budget, which is checked before decoding."""
    bomb = gif_bomb()
    assert len(bomb) < 8000
    decoded: list[int] = []
    real = video.decode_video_tail
    monkeypatch.setattr(video, "decode_video_tail",
                        lambda *a, **k: decoded.append(1) or real(*a, **k))  # type: ignore
    files = [("files", ("bomb.gif", bomb, "image/gif"))]
    r = default_client.post("/v1/rollouts", files=files, data={"params": "{}"})
    assert r.status_code == 422 and r.json()["detail"]["field"] == "files", r.text
    assert "per request" in r.json()["detail"]["message"]
    assert decoded == []  # refused before a single frame was decoded


def test_the_pixel_budget_counts_the_whole_request(budget_client: TestClient) -> None:
    """Each image is within the per-image limit; four of them are not within the request's."""
    files = [("files", (f"{i}.png", base64.b64decode(png_b64(64, i)), "image/png"))
             for i in range(4)]  # fmt: skip
    r = budget_client.post("/v1/rollouts", files=files, data={"params": "{}"})
    assert r.status_code == 422 and r.json()["detail"]["field"] == "files", r.text
    assert f"{3 * 64 * 64:,}" in r.json()["detail"]["message"]
    r = budget_client.post("/v1/rollouts", files=files[:3], data={"params": "{}"})
    assert r.status_code == 202, r.text


def test_only_the_frames_the_model_can_use_are_decoded(client: TestClient,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny model's window is 8 frames, so at most 7 context frames reach it: of 10
    images only the last 7 are decoded; the trimmed ones are named in the notes as before."""
    decoded: list[int] = []
    real = video.decode_image
    monkeypatch.setattr(video, "decode_image",
                        lambda *a, **k: decoded.append(1) or real(*a, **k))  # type: ignore
    context = [png_b64(16, i) for i in range(10)]
    s = client.app.state.settings  # type: ignore[attr-defined]
    monkeypatch.setattr(s, "max_context_frames", 10)
    r = client.post("/v1/rollouts", json={"context": context, "chunk_size": 1})
    assert r.status_code == 202, r.text
    assert len(decoded) == 7
    assert any("10 frames given" in note for note in r.json()["notes"]), r.json()
