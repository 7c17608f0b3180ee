"""server/worker.py driven tick by tick on a fakeredis queue (the loop itself runs in the API
and end-to-end tests)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
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
from dfserve.server.worker import ADMIT_WAIT_ROWS, Worker
from tests.server.specs import rollout_params as params  # as the API stores them

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


def make_worker(server: fakeredis.FakeServer, bundle: Bundle, **settings: Any) -> Worker:
    s = Settings(**{"device": "cpu", "max_batch": 2, **settings})
    return Worker(s, Queue(fakeredis.FakeRedis(server=server), **s.queue_options()), bundle)


def solo(bundle: Bundle, p: dict[str, Any]) -> np.ndarray:
    """The frames of one rollout run alone, uint8 (N, R, R, 3)."""
    ex = bundle.examples()["random"]
    req = prepare(bundle.config, ex.context, p["actions"], p["frames"], p["sampling"],
                  p["seed"], p["context_actions"]).request
    return np.stack([video.frames_to_uint8(x) for _, x in RolloutEngine(bundle).rollout(req)])


def published(q: Queue, job_id: str) -> np.ndarray:
    events = [e for e in q.events(job_id) if e.type == "frame"]
    assert [e.index for e in events] == list(range(len(events)))
    return np.stack([video.decode_image(e.png) for e in events if e.png])


def drain(w: Worker, limit: int = 10_000) -> None:
    for _ in range(limit):
        w.tick()
        if not w.live and not w.queue.queued_count():
            w.publisher.flush()  # the last frames and MP4s are on the publishing thread
            return
    raise AssertionError("the worker did not finish its jobs")


def test_continuous_batching_gives_the_frames_of_solo_runs(server: Any, tiny_bundle: Bundle
                                                           ) -> None:
    w = make_worker(server, tiny_bundle)
    q = w.queue
    pa, pb = params(tiny_bundle, 10, seed=1), params(tiny_bundle, 7, seed=2)
    a = q.submit(pa, 10)
    for _ in range(3):
        w.tick()
    assert [live.job.id for live in w.live] == [a.id]
    b = q.submit(pb, 7)
    while len(w.live) < 2:  # b joins the running batch when a's chunk is done
        a_between_chunks = RolloutEngine.between_chunks(w.live[0].state)
        w.tick()
    assert a_between_chunks and [live.job.id for live in w.live] == [a.id, b.id]
    assert w.live[0].state.rows_done > w.live[1].state.rows_done
    drain(w)
    for job, p in ((a, pa), (b, pb)):
        got = q.get(job.id)
        assert got is not None and got.status is JobStatus.succeeded
        assert video.probe_mp4(q.video(job.id) or b"").frames == p["frames"]
        # Batched float math may round a rare pixel differently: allow 1 level of 255.
        diff = np.abs(published(q, job.id).astype(int) - solo(tiny_bundle, p).astype(int))
        assert diff.max() <= 1


def test_a_long_chunk_keeps_new_jobs_out_for_a_bounded_number_of_rows(
        server: Any, tiny_bundle: Bundle) -> None:  # fmt: skip
    """New jobs wait for the batch's chunks to end (one phase, forwards of one size), but a
    rollout whose chunk takes 60 rows lets them in after ADMIT_WAIT_ROWS."""
    w = make_worker(server, tiny_bundle)
    q = w.queue
    slow = params(tiny_bundle, 4, seed=1)
    slow["sampling"] = {**slow["sampling"], "steps": 60}
    q.submit(slow, 4)
    w.tick()
    assert len(w.live) == 1 and not RolloutEngine.between_chunks(w.live[0].state)
    q.submit(params(tiny_bundle, 3, seed=2), 3)
    for _ in range(ADMIT_WAIT_ROWS):
        w.tick()
    assert len(w.live) == 1
    w.tick()
    assert len(w.live) == 2 and not RolloutEngine.between_chunks(w.live[0].state)


def test_a_failing_job_fails_alone(server: Any, tiny_bundle: Bundle) -> None:
    w = make_worker(server, tiny_bundle)
    q = w.queue
    good = q.submit(params(tiny_bundle, 4, seed=1), 4)
    other = q.submit(params(tiny_bundle, 4, seed=1, model="crafter"), 4)
    bad = q.submit(params(tiny_bundle, 4, seed=1, sampling={"sampler": "euler"}), 4)
    drain(w)
    assert q.get(good.id).status is JobStatus.succeeded  # type: ignore[union-attr]
    for job, word in ((other, "model"), (bad, "sampler")):
        got = q.get(job.id)
        assert got is not None and got.status is JobStatus.failed
        assert got.error and got.error.startswith(word), got.error


def test_a_step_error_fails_only_its_rollout(server: Any, tiny_bundle: Bundle,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    w = make_worker(server, tiny_bundle)
    q = w.queue
    a, b = q.submit(params(tiny_bundle, 6, seed=1), 6), q.submit(params(tiny_bundle, 6, seed=2), 6)
    w.tick()
    real_step = w.engine.step

    def step(states: list[Any]) -> Any:
        if any(st.request.seed == 2 for st in states):
            raise RuntimeError("boom")
        return real_step(states)

    monkeypatch.setattr(w.engine, "step", step)
    drain(w)
    assert q.get(a.id).status is JobStatus.succeeded  # type: ignore[union-attr]
    failed = q.get(b.id)
    assert failed is not None and failed.status is JobStatus.failed
    assert failed.error == "RuntimeError: boom"


def test_cancel_between_rows_frees_the_slot(server: Any, tiny_bundle: Bundle) -> None:
    w = make_worker(server, tiny_bundle, max_batch=1)
    q = w.queue
    job = q.submit(params(tiny_bundle, 200, seed=1), 200)
    waiting = q.submit(params(tiny_bundle, 3, seed=1), 3)
    for _ in range(4):
        w.tick()
    q.cancel(job.id)
    w.tick()
    assert [live.job.id for live in w.live] != [job.id]
    got = q.get(job.id)
    assert got is not None and got.status is JobStatus.cancelled and got.frames_done < 10
    drain(w)
    assert q.get(waiting.id).status is JobStatus.succeeded  # type: ignore[union-attr]


def test_graceful_stop_releases_and_another_worker_finishes(server: Any, tiny_bundle: Bundle
                                                            ) -> None:
    w1 = make_worker(server, tiny_bundle, worker_name="w1")
    p = params(tiny_bundle, 12, seed=5)
    job = w1.queue.submit(p, 12)
    for _ in range(8):
        w1.tick()
    w1.publisher.flush()
    done_before = w1.queue.get(job.id).frames_done  # type: ignore[union-attr]
    assert 0 < done_before < 12
    w1.shutdown()
    got = w1.queue.get(job.id)
    assert got is not None and got.status is JobStatus.queued and got.worker is None
    assert w1.queue.workers() == []
    w2 = make_worker(server, tiny_bundle, worker_name="w2")
    drain(w2)
    got = w2.queue.get(job.id)
    assert got is not None and got.status is JobStatus.succeeded and got.worker == "w2"
    # The re-run is deterministic and publishes only the frames w1 had not.
    assert np.abs(published(w2.queue, job.id).astype(int) - solo(tiny_bundle, p)).max() <= 1


def test_warm_up_heartbeat_and_stop(server: Any, tiny_bundle: Bundle) -> None:
    w = make_worker(server, tiny_bundle, heartbeat_ttl_s=3)
    thread = threading.Thread(target=w.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not (infos := w.queue.workers()) or not infos[0]["warmed_up"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    (info,) = infos
    assert {"host", "pid", "model", "live", "max_batch", "device"} <= set(info)
    assert (info["model"], info["max_batch"], info["name"]) == ("tiny", 2, w.name)
    job = w.queue.submit(params(tiny_bundle, 3, seed=1), 3)
    while not w.queue.get(job.id).status.terminal:  # type: ignore[union-attr]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    t0 = time.monotonic()
    w.stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive() and time.monotonic() - t0 < 2
    assert w.queue.workers() == []


def test_default_worker_name(tmp_path: Path) -> None:
    import os
    import socket

    assert Settings().resolved_worker_name() == f"{socket.gethostname()}:{os.getpid()}"
    assert Settings(worker_name="gpu-7").resolved_worker_name() == "gpu-7"


def test_the_batch_is_bounded_by_the_memory_budget(tiny_bundle):
    """max_batch is an upper bound; a 1 MiB budget admits only what fits in it."""
    server = fakeredis.FakeServer()
    per = RolloutEngine(tiny_bundle).bytes_per_rollout()
    w = make_worker(server, tiny_bundle, max_batch=64, memory_budget_mb=1)
    assert w.batch_limit == 2**20 // per and 1 <= w.batch_limit < 64
    assert make_worker(server, tiny_bundle, max_batch=5).batch_limit == 5
