"""Backpressure and input limits: a full queue answers 429 with Retry-After, an oversized
body 413 (by Content-Length or while streaming), and every size limit of a request (frames,
steps, context frames, image pixels) a 422 naming the field. In-process, embedded queue."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import numpy as np
import pytest
from fastapi.testclient import TestClient

from server import video
from server.app import create_app
from server.queue import Queue
from server.settings import Settings


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
