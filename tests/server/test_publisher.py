"""server/publisher.py: the worker's frames and MP4s leave on their own thread, a tick's frames
in one Redis pipeline, and stepping never waits for a codec (fakeredis queue, tiny model)."""

from __future__ import annotations

import threading
from typing import Any

import fakeredis
import pytest
import redis

from dfserve.model.bundle import Bundle
from dfserve.server import video
from dfserve.server.queue import JobStatus
from tests.server.specs import rollout_params as params
from tests.server.test_worker import drain, make_worker, published, solo

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


def test_stepping_goes_on_while_the_codec_is_stuck(server: Any, tiny_bundle: Bundle,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """With the PNG encoder blocked, the worker still steps its rollout row after row (the
    frames wait, bounded, for the publisher); once it is free they come out, in order."""
    w = make_worker(server, tiny_bundle)
    p = params(tiny_bundle, 12, seed=1)
    job = w.queue.submit(p, 12)
    free = threading.Event()
    real_encode = video.encode_png

    def stuck_encode(frame: Any) -> bytes:
        free.wait(60)
        return real_encode(frame)

    monkeypatch.setattr(video, "encode_png", stuck_encode)
    w.tick()
    (live,) = w.live
    for _ in range(5):  # fewer ticks than the publisher's bound: none of them may block
        w.tick()
    assert live.state is not None and live.state.rows_done == 6 and live.state.emitted > 0
    assert w.queue.get(job.id).frames_done == 0  # type: ignore[union-attr]
    free.set()
    drain(w)
    got = w.queue.get(job.id)
    assert got is not None and got.status is JobStatus.succeeded and got.frames_done == 12
    assert (published(w.queue, job.id) == solo(tiny_bundle, p)).all()
    assert video.probe_mp4(w.queue.video(job.id) or b"").frames == 12


def test_a_tick_is_published_in_one_pipeline(server: Any, tiny_bundle: Bundle,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Two rollouts in the batch: each tick's frames of both go to Redis in one call of two
    round trips, and no frame is sent on its own."""
    w = make_worker(server, tiny_bundle)
    q = w.queue
    a, b = q.submit(params(tiny_bundle, 6, seed=1), 6), q.submit(params(tiny_bundle, 6, seed=2), 6)
    calls: list[set[str]] = []  # the jobs of each publish_frames call
    round_trips: list[int] = []  # the pipelines each call sent
    pipelines = [0]
    real_publish, real_pipeline = q.publish_frames, q.redis.pipeline

    def publish_frames(frames: Any) -> list[bool]:
        calls.append({job_id for job_id, _, _ in frames})
        before = pipelines[0]
        try:
            return real_publish(frames)
        finally:
            round_trips.append(pipelines[0] - before)

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        pipelines[0] += 1
        return real_pipeline(*args, **kwargs)

    monkeypatch.setattr(q, "publish_frames", publish_frames)
    monkeypatch.setattr(q.redis, "pipeline", pipeline)
    monkeypatch.setattr(q.redis, "xadd", lambda *a, **k: pytest.fail("a frame sent alone"))
    drain(w)
    assert {a.id, b.id} in calls  # the same tick made a frame of each
    assert len(calls) < 12 and set(round_trips) == {2}  # 12 frames, fewer calls
    for job in (a, b):
        assert q.get(job.id).status is JobStatus.succeeded  # type: ignore[union-attr]


def test_redis_lost_while_publishing_drops_the_batch_and_recovers(
        server: Any, tiny_bundle: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    """The publishing thread's Redis error reaches the stepping thread at its next tick, which
    drops its live jobs (re-run after the lease, as for its own Redis errors); publishing
    resumes for the jobs that come after."""
    w = make_worker(server, tiny_bundle)
    q = w.queue
    lost = q.submit(params(tiny_bundle, 8, seed=1), 8)
    real_publish = q.publish_frames

    def down(frames: Any) -> list[bool]:
        raise redis.ConnectionError("gone")

    monkeypatch.setattr(q, "publish_frames", down)
    with pytest.raises(redis.ConnectionError):
        for _ in range(50):
            w.tick()
            w.publisher.flush()
    w.redis_lost(redis.ConnectionError("gone"), 0.1)
    assert w.live == [] and not w.publisher.videos
    monkeypatch.setattr(q, "publish_frames", real_publish)
    p = params(tiny_bundle, 4, seed=2)
    after = q.submit(p, 4)
    for _ in range(100):  # the lost job waits for its lease; the new one runs
        w.tick()
        if q.get(after.id).status.terminal:  # type: ignore[union-attr]
            break
    w.publisher.flush()
    assert q.get(after.id).status is JobStatus.succeeded  # type: ignore[union-attr]
    assert (published(q, after.id) == solo(tiny_bundle, p)).all()
    assert q.get(lost.id).status is JobStatus.running  # type: ignore[union-attr]
