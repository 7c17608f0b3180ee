"""The HTTP/WebSocket API (DESIGN §3) in-process: FastAPI's TestClient, a worker thread, and
the queue on fakeredis (the embedded mode) or real Redis at 127.0.0.1:6379 (which must be up:
those tests fail, not skip, without it)."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fakeredis
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from dfserve.model.bundle import find_bundles
from dfserve.server import video
from dfserve.server.app import create_app
from dfserve.server.queue import JobStatus, Queue
from dfserve.server.settings import Settings
from dfserve.server.worker import Worker, build_worker

# The packaged bundles are always served, beside the test's own `tiny` default.
SERVED_MODELS = sorted({*find_bundles(), "tiny"})

REDIS_URL = os.environ.get("DFSERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def png_b64(size: int = 16, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    frame = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return base64.b64encode(video.encode_png(frame)).decode()


class Store:
    """Clients over one store (fakeredis server or real Redis) under a unique key prefix."""

    def __init__(self, kind: str) -> None:
        self.kind, self.prefix = kind, f"dfserve-test-{uuid.uuid4().hex[:12]}"
        self.fake = fakeredis.FakeServer() if kind == "fakeredis" else None
        self.clients: list[Any] = []

    def client(self) -> Any:
        c = (fakeredis.FakeRedis(server=self.fake) if self.fake
             else redis.Redis.from_url(REDIS_URL))  # fmt: skip
        self.clients.append(c)
        return c

    def cleanup(self) -> None:
        c = self.client()
        for key in list(c.scan_iter(match=f"{self.prefix}:*")):
            c.delete(key)
        for c in self.clients:
            c.close()


def open_store(kind: str) -> Store:
    store = Store(kind)
    if kind == "redis":
        try:
            store.client().ping()
        except redis.RedisError as e:  # a real-Redis test must fail, not skip
            pytest.fail(f"no Redis at {REDIS_URL}: {e}")
    return store


@dataclass
class Service:
    client: TestClient
    queue: Queue  # the API's queue, to look behind the scenes
    settings: Settings
    store: Store
    workers: list[tuple[Worker, threading.Thread]] = field(default_factory=list)

    def start_worker(self, **overrides: Any) -> Worker:
        settings = self.settings.model_copy(update=overrides)
        queue = Queue(self.store.client(), **settings.queue_options())
        worker = build_worker(settings, queue, threading.Event())
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        self.workers.append((worker, thread))
        return worker

    def stop_workers(self) -> None:
        for worker, thread in self.workers:
            worker.stop.set()
            thread.join(timeout=30)
        self.workers.clear()

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while (r := self.client.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline, r.json()
            time.sleep(0.05)

    def submit(self, **body: Any) -> str:
        r = self.client.post("/v1/rollouts", json={"example": "random", **body})
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def wait(self, job_id: str, *statuses: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (doc := self.client.get(f"/v1/rollouts/{job_id}").json())["status"] not in (
                statuses or ("succeeded", "failed", "cancelled")):  # fmt: skip
            assert time.monotonic() < deadline, doc
            time.sleep(0.02)
        return doc


def make_service(kind: str, bundle: Path, **settings: Any) -> Iterator[Service]:
    store = open_store(kind)
    # One torch thread: this 2-core machine is shared, and oversubscribed OpenMP threads
    # make the tiny model ~50x slower.
    s = Settings(model=str(bundle), redis_prefix=store.prefix, lease_ms=5_000,
                 heartbeat_ttl_s=5, torch_threads=1, **settings)
    queue = Queue(store.client(), **s.queue_options())
    with TestClient(create_app(s, queue)) as client:
        service = Service(client, queue, s, store)
        try:
            yield service
        finally:
            service.stop_workers()
    store.cleanup()


@pytest.fixture
def api(tiny_bundle_dir: Path) -> Iterator[Service]:
    """The API alone (no worker) on fakeredis."""
    yield from make_service("fakeredis", tiny_bundle_dir)


@pytest.fixture(params=["fakeredis", "redis"])
def service(request: pytest.FixtureRequest, tiny_bundle_dir: Path) -> Iterator[Service]:
    """API + one worker thread (max_batch 2)."""
    for svc in make_service(request.param, tiny_bundle_dir, max_batch=2):
        svc.start_worker()
        svc.wait_ready()
        yield svc


@pytest.fixture
def embedded(tiny_bundle_dir: Path) -> Iterator[Service]:
    """API + one worker thread on fakeredis, max_batch 1 (so a second job stays queued)."""
    for svc in make_service("fakeredis", tiny_bundle_dir, max_batch=1, max_frames=2048):
        svc.start_worker()
        svc.wait_ready()
        yield svc


def read_stream(ws: Any) -> tuple[list[tuple[int, bytes]], list[dict[str, Any]]]:
    """Frames (index, image bytes) and every JSON message, until `done`."""
    frames: list[tuple[int, bytes]] = []
    messages: list[dict[str, Any]] = []
    pending: int | None = None
    while True:
        msg = ws.receive()
        if msg.get("bytes") is not None:
            assert pending is not None, "a binary message without its frame header"
            frames.append((pending, msg["bytes"]))
            pending = None
            continue
        doc = ws_json(msg)
        messages.append(doc)
        if doc["type"] == "frame":
            assert pending is None, "two frame headers in a row"
            pending = doc["index"]
        if doc["type"] == "done":
            return frames, messages


def ws_json(msg: Mapping[str, Any]) -> dict[str, Any]:
    assert msg.get("text") is not None, msg
    return json.loads(msg["text"])


# ------------------------------------------------------------------------------ lifecycle


def test_rollout_lifecycle(service: Service) -> None:
    frames = 40
    r = service.client.post("/v1/rollouts", json={
        "example": "random", "actions": ["left", "right"], "frames": frames, "steps": 3})
    assert r.status_code == 202, r.text
    created = r.json()
    job_id = created["id"]
    assert created["status"] in ("queued", "running")
    assert created["links"]["video"] == f"/v1/rollouts/{job_id}/video"
    assert any("repeated cyclically" in n for n in created["notes"])

    statuses, progress = set(), []
    with service.client.websocket_connect(f"/v1/rollouts/{job_id}/stream?format=png") as ws:
        first = ws.receive()
        statuses.add(service.queue.get(job_id).status)  # type: ignore[union-attr]
        # Consume the rest, sampling the job's status and progress as frames arrive.
        got, messages = [], []
        pending = None
        msg = first
        while True:
            if msg.get("bytes") is not None:
                got.append((pending, msg["bytes"]))
                job = service.queue.get(job_id)
                assert job is not None
                statuses.add(job.status)
                progress.append(job.frames_done)
            else:
                doc = ws_json(msg)
                messages.append(doc)
                pending = doc.get("index", pending)
                if doc["type"] == "done":
                    break
            msg = ws.receive()
    assert [i for i, _ in got] == list(range(frames))
    assert messages[-1] == {"type": "done", "status": "succeeded", "frames_done": frames}
    assert JobStatus.running in statuses
    # frames_done is written just after each frame's XADD, so it may trail the stream by one.
    assert progress == sorted(progress) and progress[0] < frames - 1 <= progress[-1]

    doc = service.wait(job_id)
    assert doc["status"] == "succeeded", doc
    assert doc["progress"] == {"frames_done": frames, "frames_total": frames}
    assert doc["started_at"] >= doc["created_at"] and doc["finished_at"] >= doc["started_at"]
    assert doc["worker"] == service.workers[0][0].name
    p = doc["params"]
    assert p["steps"] == 3 and p["schedule"] == "pyramid" and p["frames"] == frames
    # Names, as they were sent (the queue stores indices).
    assert p["actions"][:3] == ["left", "right", "left"] and isinstance(p["seed"], int)
    assert p["context_frames"] == 2 and p["context_actions"] == ["noop", "left"]  # the example's

    mp4 = service.client.get(f"/v1/rollouts/{job_id}/video")
    assert mp4.status_code == 200 and mp4.headers["content-type"] == "video/mp4"
    info = video.probe_mp4(mp4.content)
    assert (info.codec, info.pix_fmt, info.frames, info.faststart) == ("h264", "yuv420p",
                                                                       frames, True)
    for i, png in got:
        r = service.client.get(f"/v1/rollouts/{job_id}/frames/{i}")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.content == png, f"frame {i} differs between GET and the stream"
    decoded = video.decode_video(mp4.content)
    ref = np.stack([video.decode_image(png) for _, png in got]).astype(int)
    # Random-weight frames are noise, which yuv420p's chroma subsampling cannot keep; the
    # per-frame mean brightness survives H.264, so the MP4 holds these frames in this order.
    means = np.stack(decoded).astype(float).mean(axis=(1, 2, 3)) - ref.mean(axis=(1, 2, 3))
    assert np.abs(means).max() < 4


def test_stream_is_live_exactly_once_and_resumable(embedded: Service) -> None:
    frames = 300
    job_id = embedded.submit(frames=frames, steps=2)
    url = f"/v1/rollouts/{job_id}/stream?format=png"
    with embedded.client.websocket_connect(url) as ws:
        seen: list[int] = []
        while len(seen) < 5:
            doc = ws_json(ws.receive())
            if doc["type"] == "frame":
                job = embedded.queue.get(job_id)
                assert job is not None
                if not seen:  # frame 0 arrives while later ones are still being generated
                    assert job.status is JobStatus.running
                    assert job.frames_done < frames
                seen.append(doc["index"])
                assert isinstance(ws.receive()["bytes"], bytes)
    assert seen == [0, 1, 2, 3, 4]
    # Reconnect after frame 4: exactly the rest, in order, once.
    with embedded.client.websocket_connect(f"{url}&after={seen[-1]}") as ws:
        rest, messages = read_stream(ws)
    assert [i for i, _ in rest] == list(range(5, frames))
    assert messages[-1]["status"] == "succeeded"
    assert not any(m["type"] == "started" for m in messages)
    # A late client (the job is over) replays everything, as JPEG by default.
    with embedded.client.websocket_connect(f"/v1/rollouts/{job_id}/stream") as ws:
        late, messages = read_stream(ws)
    assert [i for i, _ in late] == list(range(frames))
    assert late[0][1][:2] == b"\xff\xd8"  # JPEG
    assert messages[0]["type"] == "started"
    progress = [m for m in messages if m["type"] == "progress"]
    assert progress[-1] == {"type": "progress", "frames_done": frames, "frames_total": frames}


def test_queued_client_hears_its_position(embedded: Service) -> None:
    first = embedded.submit(frames=400, steps=2)
    embedded.wait(first, "running")
    second = embedded.submit(frames=2)
    with embedded.client.websocket_connect(f"/v1/rollouts/{second}/stream") as ws:
        assert ws_json(ws.receive()) == {"type": "queued", "position": 0}
        embedded.client.delete(f"/v1/rollouts/{first}")
        frames, messages = read_stream(ws)
    assert [m["type"] for m in messages[:2]] == ["started", "frame"]
    assert len(frames) == 2 and messages[-1]["status"] == "succeeded"


def test_cancel_queued_and_running(embedded: Service) -> None:
    total = 1500
    running = embedded.submit(frames=total, steps=2)
    queued = embedded.submit(frames=3)
    assert embedded.client.get(f"/v1/rollouts/{queued}").json()["queue_position"] == 0
    r = embedded.client.delete(f"/v1/rollouts/{queued}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    with embedded.client.websocket_connect(f"/v1/rollouts/{running}/stream?format=png") as ws:
        while ws_json(ws.receive())["type"] != "frame":
            pass
        assert isinstance(ws.receive()["bytes"], bytes)
        r = embedded.client.delete(f"/v1/rollouts/{running}")
        assert r.status_code == 200
        frames, messages = read_stream(ws)
    assert messages[-1]["status"] == "cancelled"
    doc = embedded.wait(running)
    assert doc["status"] == "cancelled"
    # Stopped within a row or two of the cancel, far below the total.
    assert doc["progress"]["frames_done"] < total // 3, doc["progress"]
    assert embedded.client.get(f"/v1/rollouts/{running}/video").status_code == 409
    # The queued one never started, and its slot went to nobody.
    doc = embedded.client.get(f"/v1/rollouts/{queued}").json()
    assert doc["status"] == "cancelled" and doc["started_at"] is None and doc["worker"] is None
    assert doc["progress"]["frames_done"] == 0
    events = embedded.queue.events(queued)
    assert [e.type for e in events] == ["done"]
    # The worker is free again: a new job runs at once.
    assert embedded.wait(embedded.submit(frames=2))["status"] == "succeeded"


def test_wait_returns_the_mp4_and_metrics_count(service: Service) -> None:
    r = service.client.post("/v1/rollouts?wait=true", json={"example": "random", "frames": 5})
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    assert video.probe_mp4(r.content).frames == 5
    job_id = r.headers["x-rollout-id"]
    assert service.client.get(f"/v1/rollouts/{job_id}").json()["status"] == "succeeded"
    text = service.client.get("/metrics").text
    assert 'dfserve_jobs_finished_total{status="succeeded"} 1.0' in text
    assert "dfserve_frames_generated_total 5.0" in text
    assert "dfserve_jobs_submitted_total 1.0" in text
    assert "dfserve_queue_depth 0.0" in text
    assert 'dfserve_request_duration_seconds_count{method="POST",route="/v1/rollouts"' in text


def test_same_seed_same_frames_and_random_seed_is_stored(embedded: Service) -> None:
    a = embedded.submit(frames=4, seed=7)
    b = embedded.submit(frames=4, seed=7)
    c = embedded.submit(frames=4)
    for j in (a, b, c):
        assert embedded.wait(j)["status"] == "succeeded"
    frames = {j: [embedded.client.get(f"/v1/rollouts/{j}/frames/{i}").content for i in range(4)]
              for j in (a, b, c)}  # fmt: skip
    assert frames[a] == frames[b] and frames[a] != frames[c]
    seed = embedded.client.get(f"/v1/rollouts/{c}").json()["params"]["seed"]
    d = embedded.submit(frames=4, seed=seed)  # the stored seed reproduces the random one
    embedded.wait(d)
    assert [embedded.client.get(f"/v1/rollouts/{d}/frames/{i}").content
            for i in range(4)] == frames[c]  # fmt: skip


def test_readyz_needs_a_warm_worker(api: Service) -> None:
    r = api.client.get("/readyz")
    assert r.status_code == 503 and r.json()["redis"] is True
    assert "worker" in r.json()["reason"]
    assert api.client.get("/healthz").json() == {"status": "ok"}
    worker = api.start_worker()
    api.wait_ready()
    (info,) = api.client.get("/readyz").json()["workers"]
    assert info["warmed_up"] is True and info["model"] == "tiny"
    assert info["dtype"] == "float32"  # DFSERVE_DTYPE=auto on a CPU
    assert info["name"] == worker.name and info["pid"] == os.getpid()
    api.stop_workers()  # a graceful stop removes the heartbeat at once
    assert api.client.get("/readyz").status_code == 503


# ------------------------------------------------------------------------------ inputs


def test_models(api: Service) -> None:
    doc = api.client.get("/v1/models").json()
    assert doc["default"] == "tiny"
    assert sorted(m["id"] for m in doc["models"]) == SERVED_MODELS
    m = api.client.get("/v1/models/tiny").json()
    assert m["actions"] == ["noop", "left", "right", "up"] and m["examples"] == ["random"]
    assert m["resolution"] == 16 and m["defaults"]["steps"] == 4 and m["default"] is True
    r = api.client.get("/v1/models/nope")
    assert r.status_code == 404 and r.json()["detail"]["accepted"] == SERVED_MODELS
    spec = api.client.get("/openapi.json").json()
    body = spec["paths"]["/v1/rollouts"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)
    viewer = api.client.get("/", follow_redirects=False)  # clients/web, served at /
    assert viewer.status_code == 200 and 'data-testid="frame"' in viewer.text


def test_context_sources(api: Service) -> None:
    big = np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    jpeg = base64.b64encode(video.encode_jpeg(big)).decode()
    r = api.client.post("/v1/rollouts", json={"context": [png_b64(), f"data:image/jpeg;base64,"
                                                                     f"{jpeg}"], "frames": 3})
    assert r.status_code == 202, r.text
    job = api.queue.get(r.json()["id"])
    assert job is not None and len(job.params["context"]) == 2
    assert video.decode_image(base64.b64decode(job.params["context"][1])).shape == (16, 16, 3)
    # Too much context is trimmed to n_frames - chunk_size = 5, with a note.
    r = api.client.post("/v1/rollouts", json={"context": [png_b64(seed=i) for i in range(7)],
                                              "frames": 2})
    assert r.status_code == 202 and any("trimmed" in n for n in r.json()["notes"])
    assert api.client.get(r.json()["links"]["self"]).json()["params"]["context_frames"] == 5
    # A context video.
    clip = [np.full((32, 32, 3), 40 * i, np.uint8) for i in range(3)]
    mp4 = base64.b64encode(video.encode_mp4(clip, fps=8)).decode()
    r = api.client.post("/v1/rollouts", json={"context_video": mp4, "frames": 2})
    assert r.status_code == 202, r.text
    assert api.client.get(r.json()["links"]["self"]).json()["params"]["context_frames"] == 3
    # Multipart: files plus a params field.
    files = [("files", (f"{i}.png", base64.b64decode(png_b64(seed=i)), "image/png"))
             for i in range(2)]  # fmt: skip
    r = api.client.post("/v1/rollouts", files=files,
                        data={"params": '{"frames": 4, "actions": ["up"], "seed": 3}'})
    assert r.status_code == 202, r.text
    p = api.client.get(r.json()["links"]["self"]).json()["params"]
    assert (p["context_frames"], p["actions"], p["seed"]) == (2, ["up"] * 4, 3)


def test_idempotency_key(api: Service) -> None:
    headers = {"Idempotency-Key": "abc"}
    a = api.client.post("/v1/rollouts", json={"example": "random"}, headers=headers).json()
    b = api.client.post("/v1/rollouts", json={"example": "random"}, headers=headers).json()
    c = api.client.post("/v1/rollouts", json={"example": "random"}).json()
    assert a["id"] == b["id"] != c["id"]


BAD_INPUTS: list[tuple[dict[str, Any], str | None, Any]] = [
    ({"schedule": "zigzag"}, "schedule", ["pyramid", "autoregressive", "full_sequence",
                                          "trapezoid"]),
    ({"sampler": "euler"}, "sampler", ["ddim", "ddpm", "dpmpp_2m"]),
    ({"sampler": 3}, "sampler", ["ddim", "ddpm", "dpmpp_2m"]),
    ({"model": "nope"}, "model", SERVED_MODELS),
    ({"actions": ["left", "jump"]}, "actions", ["noop", "left", "right", "up"]),
    ({"context_actions": ["fly", "noop"]}, "context_actions", ["noop", "left", "right", "up"]),
    ({"frames": 0}, "frames", None),
    ({"frames": -3}, "frames", None),
    ({"frames": 100_000}, "frames", None),
    ({"example": "nope"}, "example", ["random"]),
    ({"example": None}, "context", ["context", "context_video", "example", "files"]),
    ({"example": None, "context": ["aGVsbG8="]}, "context[0]", None),
    ({"example": None, "context": ["%%%"]}, "context[0]", None),
    ({"example": None, "context_video": "aGVsbG8="}, "context_video", None),
    ({"frames": "8"}, "frames", None),
    ({"frames": 2.5}, "frames", None),
    ({"steps": True}, "steps", None),
    ({"actions": "left"}, "actions", None),
    ({"actions": [{"a": 1}]}, "actions.0", None),
    ({"context": "abc", "example": None}, "context", None),
    ({"stpes": 8}, "stpes", None),
    ({"steps": 0}, "steps", None),
    ({"eta": 3.0}, "eta", None),
    ({"seed": -1}, "seed", None),
    ({"fps": 0}, "fps", None),
    ({"context_noise_mode": "x"}, "context_noise_mode", ["relabel", "noised", "scaled"]),
]


@pytest.mark.parametrize(("body", "field", "accepted"), BAD_INPUTS,
                         ids=[next(iter(b)) + f"-{i}" for i, (b, _, _) in enumerate(BAD_INPUTS)])
def test_bad_input_names_the_field(api: Service, body: dict[str, Any], field: str,
                                   accepted: Any) -> None:
    r = api.client.post("/v1/rollouts", json={"example": "random", **body})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail["field"] == field, detail
    assert detail["message"]
    if accepted is not None:
        assert detail["accepted"] == accepted
        assert "[" not in detail["message"], "the accepted values belong in `accepted` only"
    if field == "stpes":
        assert "steps" in detail["accepted"]
    assert api.queue.queued_count() == 0


def test_an_unknown_name_is_answered_as_model_words_it(api: Service) -> None:
    """The schema refuses an unknown schedule (a Literal type) with the body model/'s
    FieldError gives: the value, and the names in `accepted` only."""
    r = api.client.post("/v1/rollouts", json={"example": "random", "schedule": "zigzag"})
    assert r.status_code == 422
    assert r.json() == {"detail": {"field": "schedule",
                                   "message": "'zigzag' is not an accepted value",
                                   "accepted": ["pyramid", "autoregressive", "full_sequence",
                                                "trapezoid"]}}  # fmt: skip


def test_a_server_bug_is_not_a_client_error(api: Service,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a FieldError is the client's: any other ValueError is a 500, not a 422."""
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("steps: a bug that merely looks like a field error")

    monkeypatch.setattr("dfserve.server.routes.rollouts.job_spec", broken)
    with TestClient(api.client.app, raise_server_exceptions=False) as client:
        r = client.post("/v1/rollouts", json={"example": "random"})
    assert r.status_code == 500, r.text


def test_bad_bodies(tiny_bundle_dir: Path) -> None:
    for svc in make_service("fakeredis", tiny_bundle_dir, max_body_bytes=4096, max_queued=1,
                            max_frames=50):
        c = svc.client
        r = c.post("/v1/rollouts", content=b"{not json", headers={"content-type":
                                                                   "application/json"})
        assert r.status_code == 422 and "JSON" in r.json()["detail"]["message"]
        r = c.post("/v1/rollouts", content=b"[1, 2]",
                   headers={"content-type": "application/json"})
        assert r.status_code == 422
        r = c.post("/v1/rollouts", content=b"x", headers={"content-type": "text/plain"})
        assert r.status_code == 415 and "application/json" in r.json()["detail"]["accepted"]
        r = c.post("/v1/rollouts", json={"example": "random", "context": ["A" * 8000]})
        assert r.status_code == 413 and "4096" in r.json()["detail"]["message"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming
            yield b'{"example": "random", "pad": "'
            for _ in range(10):
                yield b"x" * 1000
            yield b'"}'

        r = c.post("/v1/rollouts", content=chunks(), headers={"content-type":
                                                               "application/json"})
        assert r.status_code == 413, r.text
        r = c.post("/v1/rollouts", json={"example": "random", "frames": 51})
        assert r.status_code == 422 and "50" in r.json()["detail"]["message"]
        r = c.post("/v1/rollouts", files=[("files", ("a.png", b"garbage", "image/png"))],
                   data={"params": "{}"})
        assert r.status_code == 422 and r.json()["detail"]["field"] == "files[0] (a.png)"
        r = c.post("/v1/rollouts", files=[("files", ("a.png", b"garbage", "image/png"))],
                   data={"params": '{"frames": "x"}'})
        assert r.status_code == 422 and r.json()["detail"]["field"] == "frames"
        r = c.post("/v1/rollouts", json={"example": "random"})
        assert r.status_code == 202
        job = svc.queue.get(r.json()["id"])
        assert job is not None
        r = c.post("/v1/rollouts", json={"example": "random"})
        assert r.status_code == 429 and r.headers["retry-after"] == "5"
        for path in ("", "/video", "/frames/0"):
            r = c.get(f"/v1/rollouts/nope{path}")
            assert r.status_code == 404 and r.json()["detail"]["field"] == "id"
        assert c.delete("/v1/rollouts/nope").status_code == 404
        r = c.get(f"/v1/rollouts/{job.id}/video")
        assert r.status_code == 409 and "queued" in r.json()["detail"]["message"]
        r = c.get(f"/v1/rollouts/{job.id}/frames/0")
        assert r.status_code == 409
        r = c.get(f"/v1/rollouts/{job.id}/frames/99")
        assert r.status_code == 404 and r.json()["detail"]["field"] == "index"
        with c.websocket_connect("/v1/rollouts/nope/stream") as ws:
            doc = ws_json(ws.receive())
            assert doc["type"] == "error" and doc["detail"]["field"] == "id"
        with c.websocket_connect(f"/v1/rollouts/{job.id}/stream?format=gif") as ws:
            doc = ws_json(ws.receive())
            assert doc["detail"] == {"field": "format", "message": "'gif' is not supported",
                                     "accepted": ["jpeg", "png"]}


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DFSERVE_CORS_ORIGINS", "http://a.example, http://b.example")
    monkeypatch.setenv("DFSERVE_MODELS_DIR", f"{tmp_path},{tmp_path / 'x'}")
    monkeypatch.setenv("DFSERVE_MAX_BATCH", "3")
    monkeypatch.setenv("DFSERVE_REDIS_URL", "redis://h:1/0")
    s = Settings()
    assert s.cors_origins == ["http://a.example", "http://b.example"]
    assert s.models_dir == [tmp_path, tmp_path / "x"] and s.max_batch == 3
    assert s.redis_url == "redis://h:1/0" and s.api_keys == []
    with pytest.raises(ValueError, match="model"):
        Settings(model="nope").default_model()
    assert s.resolved_dtype() == "float32"  # auto on a CPU
    assert Settings(device="cuda").resolved_dtype() == "bfloat16"
    monkeypatch.setenv("DFSERVE_DTYPE", "float16")
    assert Settings().resolved_dtype() == "float16"
    monkeypatch.setenv("DFSERVE_DTYPE", "int8")
    with pytest.raises(ValueError, match="dtype"):
        Settings()


# ------------------------------------------------------------------------------ newcomer issues


def test_list_rollouts_newest_first_in_pages(api: Service) -> None:
    ids = [api.submit(frames=2 + i) for i in range(5)]
    api.client.delete(f"/v1/rollouts/{ids[1]}")
    r = api.client.get("/v1/rollouts?limit=2")
    assert r.status_code == 200, r.text
    page = r.json()
    assert [j["id"] for j in page["rollouts"]] == [ids[4], ids[3]]
    first = page["rollouts"][0]
    assert first["status"] == "queued" and first["progress"] == {"frames_done": 0,
                                                                  "frames_total": 6}
    assert first["links"]["self"] == f"/v1/rollouts/{ids[4]}"
    seen = [j["id"] for j in page["rollouts"]]
    statuses = {}
    while page["next_cursor"] is not None:
        page = api.client.get(f"/v1/rollouts?limit=2&cursor={page['next_cursor']}").json()
        seen += [j["id"] for j in page["rollouts"]]
        statuses |= {j["id"]: j["status"] for j in page["rollouts"]}
    assert seen == ids[::-1]  # every job once, newest first
    assert statuses[ids[1]] == "cancelled"
    # A job that expired leaves the list (and the index) instead of breaking the page.
    api.store.client().delete(api.queue.keys.job(ids[4]))
    assert [j["id"] for j in api.client.get("/v1/rollouts").json()["rollouts"]] == ids[3::-1]
    for query, name in (("limit=0", "limit"), ("limit=101", "limit"), ("cursor=abc", "cursor"),
                        ("cursor=%C2%B2", "cursor")):  # a superscript 2: a digit, not ASCII
        r = api.client.get(f"/v1/rollouts?{query}")
        assert r.status_code == 422 and r.json()["detail"]["field"] == name, r.text


def test_list_rollouts_shows_only_the_callers_jobs(tiny_bundle_dir: Path) -> None:
    for svc in make_service("fakeredis", tiny_bundle_dir, api_keys=["key-a", "key-b"]):
        a = {"Authorization": "Bearer key-a"}
        b = {"Authorization": "Bearer key-b"}
        mine = [svc.client.post("/v1/rollouts", json={"example": "random"}, headers=a)
                .json()["id"] for _ in range(2)]  # fmt: skip
        theirs = svc.client.post("/v1/rollouts", json={"example": "random"}, headers=b)
        listed = svc.client.get("/v1/rollouts", headers=a).json()
        assert [j["id"] for j in listed["rollouts"]] == mine[::-1]
        assert [j["id"] for j in svc.client.get("/v1/rollouts", headers=b).json()[
            "rollouts"]] == [theirs.json()["id"]]
        assert svc.client.get("/v1/rollouts").status_code == 401


def test_models_report_the_enforced_frame_limit(tiny_bundle_dir: Path) -> None:
    for svc in make_service("fakeredis", tiny_bundle_dir, max_frames=40):
        m = svc.client.get("/v1/models/tiny").json()
        assert m["max_rollout_frames"] == 40
        listed = {d["id"]: d for d in svc.client.get("/v1/models").json()["models"]}
        assert all(d["max_rollout_frames"] == 40 for d in listed.values())
        assert svc.client.post("/v1/rollouts", json={"example": "random",
                                                      "frames": 40}).status_code == 202
        r = svc.client.post("/v1/rollouts", json={"example": "random", "frames": 41})
        assert r.status_code == 422 and r.json()["detail"]["field"] == "frames"


def test_notes_say_what_happened_to_the_actions(api: Service) -> None:
    r = api.client.post("/v1/rollouts", json={"example": "random", "frames": 2})
    notes = r.json()["notes"]  # the example brings 4 actions: 2 are used
    assert notes == ["actions: 4 given for 2 frames, only the first 2 used"], notes
    doc = api.client.get(r.json()["links"]["self"]).json()
    assert doc["params"]["actions"] == ["left", "right"]
    r = api.client.post("/v1/rollouts", json={"example": "random", "frames": 6})
    assert r.json()["notes"] == ["actions: 4 given for 6 frames, repeated cyclically"]
    r = api.client.post("/v1/rollouts", json={"example": "random", "actions": [1, "up"],
                                              "frames": 2})  # fmt: skip
    assert r.json()["notes"] == []
    assert api.client.get(r.json()["links"]["self"]).json()["params"]["actions"] == [
        "left", "up"]


def test_multipart_errors_name_the_form_field(api: Service) -> None:
    png = base64.b64decode(png_b64())
    r = api.client.post("/v1/rollouts", files=[("files", ("a.png", png, "image/png"))],
                        data={"params": "{not json"})
    assert r.status_code == 422 and r.json()["detail"]["field"] == "params", r.text
    r = api.client.post("/v1/rollouts", files=[("files", ("a.png", png, "image/png"))],
                        data={"params": "[1, 2]"})
    assert r.status_code == 422 and r.json()["detail"]["field"] == "params", r.text
    r = api.client.post("/v1/rollouts",
                        files=[("context_video", ("clip.mp4", b"not a video", "video/mp4"))])
    assert r.status_code == 422, r.text
    assert r.json()["detail"]["field"] == "context_video (clip.mp4)"
    r = api.client.post("/v1/rollouts", files=[("context", ("a.png", png, "image/png")),
                                               ("context", ("b.png", b"junk", "image/png"))])
    assert r.status_code == 422 and r.json()["detail"]["field"] == "context[1] (b.png)"
    r = api.client.post("/v1/rollouts", files=[("frames", ("a.png", png, "image/png"))])
    assert r.status_code == 422 and r.json()["detail"]["field"] == "frames"
    assert r.json()["detail"]["accepted"] == ["params", "files", "context", "context_video"]
    clip = video.encode_mp4([np.full((16, 16, 3), 60 * i, np.uint8) for i in range(3)], fps=8)
    r = api.client.post("/v1/rollouts", files=[("context_video", ("c.mp4", clip, "video/mp4"))],
                        data={"params": '{"frames": 2}'})
    assert r.status_code == 202, r.text
    assert api.client.get(r.json()["links"]["self"]).json()["params"]["context_frames"] == 3
    assert api.queue.queued_count() == 1


def test_delete_of_a_running_job_says_cancelling(api: Service) -> None:
    job_id = api.submit(frames=8)
    # A worker has claimed and started it but not stepped yet: the cancel cannot have taken
    # effect, so the answer must say it is under way.
    (claimed,) = api.queue.claim("test-worker", 1)
    assert api.queue.start(claimed, "test-worker")
    r = api.client.delete(f"/v1/rollouts/{job_id}")
    assert r.status_code == 200 and r.json()["status"] == "cancelling", r.text
    assert api.client.get(f"/v1/rollouts/{job_id}").json()["status"] == "cancelling"
    listed = api.client.get("/v1/rollouts").json()["rollouts"]
    assert [(j["id"], j["status"]) for j in listed] == [(job_id, "cancelling")]
    api.queue.finish(claimed, JobStatus.cancelled)
    assert api.client.get(f"/v1/rollouts/{job_id}").json()["status"] == "cancelled"
