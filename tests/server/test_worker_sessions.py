"""server/worker.py playing sessions (WS /v1/sessions below the socket), tick by tick on a
fakeredis queue: actions as they come, a batch shared with rollouts, idle endings, hand-over to
the next worker."""

from __future__ import annotations

import time
from typing import Any

import fakeredis
import numpy as np
import pytest

from dfserve.model.bundle import Bundle
from dfserve.model.request import prepare
from dfserve.model.rollout import RolloutEngine
from dfserve.server import video
from dfserve.server.queue import JobStatus, Queue
from dfserve.server.settings import Settings
from dfserve.server.worker import Worker
from tests.server.specs import session_params

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fake() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


def make_worker(fake: fakeredis.FakeServer, bundle: Bundle, **settings: Any) -> Worker:
    s = Settings(**{"device": "cpu", "max_batch": 2, "worker_name": f"w{id(settings)}",
                    **settings})
    return Worker(s, Queue(fakeredis.FakeRedis(server=fake), **s.queue_options()), bundle)


def all_up_front(bundle: Bundle, actions: list[int], seed: int = 3) -> np.ndarray:
    ex = bundle.examples()["random"]
    req = prepare(bundle.config, ex.context, actions, len(actions),
                  {"steps": 3, "chunk_size": 1}, seed, list(ex.context_actions)).request
    return np.stack([video.frames_to_uint8(x) for _, x in RolloutEngine(bundle).rollout(req)])


def frames_of(q: Queue, job_id: str) -> list[np.ndarray]:
    events = [e for e in q.events(job_id) if e.type == "frame"]
    assert [e.index for e in events] == list(range(len(events)))
    return [video.decode_image(e.png) for e in events if e.png]


def tick_until(w: Worker, done: Any, limit: int = 2000) -> None:
    for _ in range(limit):
        w.tick()
        w.publisher.flush()  # frames and MP4s are published on the publishing thread
        if done():
            return
    raise AssertionError("the worker did not get there")


def test_worker_plays_a_session_like_an_all_up_front_rollout(fake: Any,
                                                             tiny_bundle: Bundle) -> None:
    w = make_worker(fake, tiny_bundle)
    job = w.queue.submit_session(session_params(tiny_bundle))
    w.tick()
    (live,) = w.live
    assert live.session is not None and live.state is None  # waiting for its first action
    for _ in range(5):  # idle: nothing is stepped, nothing published, no busy loop
        t0 = time.monotonic()
        w.tick()
        assert time.monotonic() - t0 >= 0.015
    assert frames_of(w.queue, job.id) == []
    actions = [1, 3, 3, 2, 0, 1, 2]
    w.queue.push_actions(job.id, actions[:1])
    tick_until(w, lambda: len(frames_of(w.queue, job.id)) == 1)
    w.queue.push_actions(job.id, actions[1:4])
    tick_until(w, lambda: len(frames_of(w.queue, job.id)) == 4)
    for a in actions[4:]:  # one at a time, as a player would
        w.queue.push_actions(job.id, [a])
    tick_until(w, lambda: len(frames_of(w.queue, job.id)) == len(actions))
    got = np.stack(frames_of(w.queue, job.id))
    assert np.array_equal(got, all_up_front(tiny_bundle, actions))
    assert w.live == [live] and w.queue.get(job.id).status is JobStatus.running
    assert job.id not in w.publisher.videos  # a session has no MP4
    # The client leaves: the API cancels, the slot is free after one tick.
    w.queue.cancel(job.id)
    w.tick()
    assert w.live == [] and w.queue.get(job.id).status is JobStatus.cancelled


def test_a_session_and_a_rollout_share_the_batch(fake: Any, tiny_bundle: Bundle) -> None:
    w = make_worker(fake, tiny_bundle)
    session = w.queue.submit_session(session_params(tiny_bundle))
    p = {**session_params(tiny_bundle), "actions": [1, 2, 3], "frames": 3, "notes": []}
    rollout = w.queue.submit(p, 3)
    w.queue.push_actions(session.id, [1, 2, 3])
    tick_until(w, lambda: w.queue.get(rollout.id).status.terminal)
    assert w.queue.get(rollout.id).status is JobStatus.succeeded
    tick_until(w, lambda: len(frames_of(w.queue, session.id)) == 3)
    # Same context, actions and seed: the session's frames are the rollout's.
    assert np.array_equal(np.stack(frames_of(w.queue, session.id)),
                          np.stack(frames_of(w.queue, rollout.id)))


def test_idle_sessions_end(fake: Any, tiny_bundle: Bundle) -> None:
    w = make_worker(fake, tiny_bundle, session_idle_s=0.3)
    job = w.queue.submit_session(session_params(tiny_bundle))
    w.queue.push_actions(job.id, [1])
    tick_until(w, lambda: len(frames_of(w.queue, job.id)) == 1)
    t0 = time.monotonic()
    tick_until(w, lambda: not w.live)
    assert time.monotonic() - t0 >= 0.25
    doc = w.queue.get(job.id)
    assert doc.status is JobStatus.cancelled and "idle" in (doc.error or "")


def test_a_released_session_is_replayed_without_duplicates(fake: Any,
                                                           tiny_bundle: Bundle) -> None:
    """Graceful shutdown hands the session back; the next worker replays the action stream
    from the stored seed and publishes only the frames that were missing."""
    first = make_worker(fake, tiny_bundle)
    job = first.queue.submit_session(session_params(tiny_bundle))
    first.queue.push_actions(job.id, [1, 3])
    tick_until(first, lambda: len(frames_of(first.queue, job.id)) == 2)
    first.shutdown()
    first.queue.push_actions(job.id, [2, 2])
    second = make_worker(fake, tiny_bundle)
    tick_until(second, lambda: len(frames_of(second.queue, job.id)) == 4)
    got = np.stack(frames_of(second.queue, job.id))
    assert np.array_equal(got, all_up_front(tiny_bundle, [1, 3, 2, 2]))
    assert any("released" in note for note in second.queue.get(job.id).notes)


def test_a_bad_session_fails_alone(fake: Any, tiny_bundle: Bundle) -> None:
    w = make_worker(fake, tiny_bundle)
    job = w.queue.submit_session({**session_params(tiny_bundle), "model": "other"})
    w.tick()
    doc = w.queue.get(job.id)
    assert doc.status is JobStatus.failed and "model" in (doc.error or "")
    assert w.live == []
