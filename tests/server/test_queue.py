"""server/queue/ against real Redis (127.0.0.1:6379) and fakeredis (the embedded mode).

The real-Redis half fails, not skips, when Redis is unreachable, unless DFSERVE_ALLOW_NO_REDIS=1.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import fakeredis
import pytest
import redis
import redis.connection
from redis.backoff import NoBackoff
from redis.retry import Retry

from dfserve.server.queue import ClaimedJob, Event, Job, JobStatus, Queue, QueueFull

REDIS_URL = os.environ.get("DFSERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PNG = b"\x89PNG\r\n\x1a\n"  # binary payloads must round-trip untouched

MakeQueue = Callable[..., Queue]


@pytest.fixture(params=["redis", "fakeredis"])
def client(request: pytest.FixtureRequest) -> Iterator[Any]:
    if request.param == "fakeredis":
        yield fakeredis.FakeRedis(server=fakeredis.FakeServer())
        return
    r = redis.Redis.from_url(REDIS_URL)
    try:
        r.ping()
    except redis.RedisError as e:
        if os.environ.get("DFSERVE_ALLOW_NO_REDIS") == "1":
            pytest.skip(f"no Redis at {REDIS_URL} (DFSERVE_ALLOW_NO_REDIS=1)")
        pytest.fail(f"no Redis at {REDIS_URL}: {e} (set DFSERVE_ALLOW_NO_REDIS=1 to skip)")
    yield r
    r.close()


@pytest.fixture
def make_queue(client: Any) -> Iterator[MakeQueue]:
    """Queues over one store under a unique prefix, all of whose keys are deleted afterwards."""
    prefix = f"dfserve-test-{uuid.uuid4().hex[:12]}"
    yield lambda **kw: Queue(client, prefix=prefix, **kw)
    for key in list(client.scan_iter(match=f"{prefix}:*")):
        client.delete(key)


@pytest.fixture
def q(make_queue: MakeQueue) -> Queue:
    return make_queue()


def claim_one(q: Queue, consumer: str = "w1", block_ms: int = 0) -> ClaimedJob:
    jobs = q.claim(consumer, 1, block_ms)
    assert len(jobs) == 1, jobs
    return jobs[0]


def later(delay_s: float, fn: Callable[[], Any]) -> threading.Thread:
    """Run fn in another thread after delay_s (the other side of a blocking call)."""
    def run() -> None:
        time.sleep(delay_s)
        fn()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_lifecycle(q: Queue) -> None:
    job = q.submit({"seed": 3, "frames": 3}, frames_total=3, owner="alice")
    assert (job.status, job.queue_position, job.owner) == (JobStatus.queued, 0, "alice")
    c = claim_one(q)
    assert (c.id, c.params, c.frames_total, c.deliveries, c.frames_done) == (
        job.id, {"seed": 3, "frames": 3}, 3, 1, 0)
    assert q.start(c, "host:1")
    running = q.get(job.id)
    assert running is not None and running.status is JobStatus.running
    assert running.worker == "host:1" and running.queue_position is None and running.started_at
    for i in range(3):
        assert q.publish_frame(job.id, i, PNG + bytes([i]))
    assert q.get(job.id).frames_done == 3  # type: ignore[union-attr]
    assert q.finish(c, JobStatus.succeeded, video=b"\x00mp4\xff")
    done = q.get(job.id)
    assert done is not None and done.status is JobStatus.succeeded and done.error is None
    assert done.finished_at is not None and done.started_at is not None
    assert done.finished_at >= done.started_at >= done.created_at
    assert q.video(job.id) == b"\x00mp4\xff"
    assert q.frame_png(job.id, 1) == PNG + b"\x01"
    assert q.frame_png(job.id, 3) is None and q.frame_png(job.id, -1) is None
    events = q.events(job.id)
    assert [(e.type, e.index) for e in events] == [
        ("started", None), ("frame", 0), ("frame", 1), ("frame", 2), ("done", None)]
    assert events[0].data == {"worker": "host:1"} and events[-1].status is JobStatus.succeeded
    assert q.claim("w2", 5, 0) == []
    assert q.redis.xpending(q.keys.jobs, "workers")["pending"] == 0
    assert q.redis.xlen(q.keys.jobs) == 0  # acked entries are deleted
    assert not q.finish(c, JobStatus.failed, error="late")  # a second finish changes nothing
    assert q.get(job.id).status is JobStatus.succeeded  # type: ignore[union-attr]


def test_failed_job_keeps_error(q: Queue) -> None:
    job = q.submit({}, 2)
    c = claim_one(q)
    q.start(c, "h:1")
    assert q.finish(c, JobStatus.failed, error="CUDA out of memory")
    got = q.get(job.id)
    assert got is not None and (got.status, got.error) == (JobStatus.failed, "CUDA out of memory")
    assert q.events(job.id)[-1].data["error"] == "CUDA out of memory"
    with pytest.raises(ValueError, match="terminal"):
        q.finish(c, JobStatus.running)


def test_get_unknown_and_bad_input(q: Queue) -> None:
    assert q.get("nope") is None and q.cancel("nope") is None and q.video("nope") is None
    assert q.events("nope") == []
    with pytest.raises(ValueError, match="frames_total"):
        q.submit({}, 0)


def test_queue_position_order(q: Queue) -> None:
    ids = [q.submit({"n": i}, 1).id for i in range(4)]
    assert [q.get(i).queue_position for i in ids] == [0, 1, 2, 3]  # type: ignore[union-attr]
    assert q.queued_count() == 4
    c = claim_one(q)
    assert c.id == ids[0]  # FIFO
    q.start(c, "h:1")
    assert [q.get(i).queue_position for i in ids] == [None, 0, 1, 2]  # type: ignore[union-attr]
    q.cancel(ids[2])
    assert [q.get(i).queue_position for i in ids] == [None, 0, None, 1]  # type: ignore[union-attr]
    assert q.queued_count() == 2


def test_idempotency(q: Queue) -> None:
    a = q.submit({"x": 1}, 2, owner="alice", idempotency_key="k1")
    assert q.submit({"x": 1}, 2, owner="alice", idempotency_key="k1").id == a.id
    assert q.submit({"x": 1}, 2, owner="bob", idempotency_key="k1").id != a.id  # per owner
    assert q.submit({"x": 1}, 2, owner="alice", idempotency_key="k2").id != a.id
    assert q.queued_count() == 3


def test_idempotency_concurrent(q: Queue) -> None:
    barrier, ids, errors = threading.Barrier(16), [], []

    def submit() -> None:
        try:
            barrier.wait()
            ids.append(q.submit({"x": 1}, 2, owner="o", idempotency_key="same").id)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=submit) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(ids) == 16 and len(set(ids)) == 1
    assert q.queued_count() == 1
    assert len(q.claim("w", 10, 0)) == 1  # one job in the stream, not 16


class Died(BaseException):
    """The submitting process dies: not an error redis-py would retry or clean up after."""


@dataclass(frozen=True)
class Stored:
    """What a submit writes, as job ids: hashes, the queued set, the job stream, the owner's
    index; where the idempotency key points; the `submitted` counter."""

    hashes: frozenset[str]
    queued: frozenset[str]
    stream: frozenset[str]
    owned: frozenset[str]
    idem: str | None
    submitted: int


def stored(q: Queue, owner: str, key: str) -> Stored:
    def ids(raw: Any) -> frozenset[str]:
        return frozenset(i.decode() for i in raw)

    prefix = len(q.keys.job(""))
    idem = q.redis.get(q.keys.idem(owner, key))
    return Stored(
        hashes=frozenset(k.decode()[prefix:] for k in q.redis.keys(q.keys.job("*"))),
        queued=ids(q.redis.zrange(q.keys.queued, 0, -1)),
        stream=ids(f[b"id"] for _, f in q.redis.xrange(q.keys.jobs)),
        owned=ids(q.redis.zrange(q.keys.owned(owner), 0, -1)),
        idem=idem.decode() if idem else None, submitted=q.stats().get("submitted", 0))


def die_after(q: Queue, packets: int, submit: Callable[[], Job]) -> Job | None:
    """Run `submit`, whose process dies instead of sending its packet number packets + 1 to
    Redis (nothing after it is sent either); the job if it got that far."""
    send = redis.connection.AbstractConnection.send_packed_command
    sent = 0

    def send_or_die(conn: Any, command: Any, check_health: bool = True) -> None:
        nonlocal sent
        sent += 1
        if sent > packets + 1:  # redis-py's cleanup after the death (UNWATCH) goes nowhere
            raise redis.ConnectionError("the submitting process died")
        if sent > packets:
            raise Died
        send(conn, command, check_health)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(redis.connection.AbstractConnection, "send_packed_command", send_or_die)
        try:
            return submit()
        except Died:
            return None
        finally:
            q.redis.connection_pool.disconnect()  # the dead process's connections close


def assert_whole_or_absent(before: Stored, after: Stored, listed: bool) -> str | None:
    """After a submit died: no trace of the job, or all of it (queued, in the stream, under
    its key, counted, and listed if a rollout). Returns the job's id when it is there."""
    new = after.hashes - before.hashes
    if not new:
        assert after == before, "a dead submit left part of a job behind"
        return None
    (job_id,) = new
    assert after.queued == before.queued | {job_id}
    assert after.stream == before.stream | {job_id}  # a worker will claim it
    assert after.owned == (before.owned | {job_id} if listed else before.owned)
    assert after.submitted == before.submitted + 1
    return job_id


def test_submit_is_whole_or_absent_wherever_it_dies(q: Queue) -> None:
    """One MULTI/EXEC: a submit that dies at any round trip leaves all of its job or none, and
    a retry with the same idempotency key always gets a job that will run."""
    packets = 0
    while True:
        key = f"k{packets}"
        before = stored(q, "alice", key)
        job = die_after(q, packets, partial(q.submit, {"n": 1}, 2, owner="alice",
                                            idempotency_key=key))
        after = stored(q, "alice", key)
        job_id = assert_whole_or_absent(before, after, listed=True)
        assert after.idem == job_id  # the key points at the whole job, or at nothing yet
        assert (job_id is not None) == (job is not None)  # EXEC was its last round trip
        retry = q.submit({"n": 1}, 2, owner="alice", idempotency_key=key)
        assert retry.id == (job_id or retry.id) and retry.status is JobStatus.queued
        assert retry.id in stored(q, "alice", key).stream  # a worker will run it
        if job is not None:
            break
        packets += 1
    assert packets >= 2  # it died at every round trip before EXEC (WATCH, GET, ...), then lived
    assert job.id == retry.id and job.queue_position == q.queued_count() - 1


def test_session_is_submitted_with_no_frames(q: Queue) -> None:
    """A session has frames_total 0 from its first write on (never a frame to make before an
    action comes), wherever its submit dies; and it is not listed among rollouts."""
    packets = 0
    while True:
        before = stored(q, "bob", "-")
        job = die_after(q, packets, lambda: q.submit_session({"model": "m"}, owner="bob"))
        after = stored(q, "bob", "-")
        if job_id := assert_whole_or_absent(before, after, listed=False):
            got = q.get(job_id)
            assert got is not None and got.frames_total == 0 and got.params["kind"] == "session"
        if job is not None:
            break
        packets += 1
    assert (job.frames_total, job.status, job.params) == (
        0, JobStatus.queued, {"model": "m", "kind": "session"})
    assert q.list_jobs("bob", 10) == ([], None)
    c = claim_one(q)
    assert (c.id, c.frames_total) == (job.id, 0)
    assert q.push_actions(job.id, [3, 1]) == 2


def test_idempotency_key_of_an_expired_job_is_taken_over(q: Queue) -> None:
    old = q.submit({}, 1, owner="o", idempotency_key="k")
    q.redis.delete(q.keys.job(old.id))  # its hash expired before the key did
    new = q.submit({}, 1, owner="o", idempotency_key="k")
    assert new.id != old.id and q.redis.get(q.keys.idem("o", "k")) == new.id.encode()
    assert q.submit({}, 1, owner="o", idempotency_key="k").id == new.id
    assert [c.id for c in q.claim("w", 5, 0)] == [new.id]  # the old entry is skipped


def test_queue_full(make_queue: MakeQueue) -> None:
    q = make_queue(max_queued=2)
    first = q.submit({}, 1, idempotency_key="a")
    q.submit({}, 1)
    with pytest.raises(QueueFull) as info:
        q.submit({}, 1)
    assert (info.value.queued, info.value.limit) == (2, 2)
    assert q.submit({}, 1, idempotency_key="a").id == first.id  # a retry is not a new job
    q.start(claim_one(q), "h:1")  # running jobs do not count
    q.submit({}, 1)


def test_cancel_queued_never_runs(q: Queue) -> None:
    a, b = q.submit({"n": "a"}, 2), q.submit({"n": "b"}, 2)
    got = q.cancel(a.id)
    assert got is not None and got.status is JobStatus.cancelled and got.queue_position is None
    assert got.finished_at is not None
    assert [(e.type, e.status) for e in q.events(a.id)] == [("done", JobStatus.cancelled)]
    assert [c.id for c in q.claim("w", 5, 0)] == [b.id]
    assert q.redis.xpending(q.keys.jobs, "workers")["pending"] == 1  # a was acked, b is held
    assert q.cancel(a.id).status is JobStatus.cancelled  # type: ignore[union-attr]
    assert not q.publish_frame(a.id, 0, PNG)  # nothing is appended after done


def test_cancel_between_claim_and_start(q: Queue) -> None:
    job = q.submit({}, 2)
    c = claim_one(q)
    assert q.cancel(job.id).status is JobStatus.cancelled  # type: ignore[union-attr]
    assert not q.start(c, "h:1")  # the worker must not run it
    assert q.get(job.id).status is JobStatus.cancelled  # type: ignore[union-attr]
    assert q.redis.xpending(q.keys.jobs, "workers")["pending"] == 0


def test_cancel_running_sets_flag(q: Queue) -> None:
    job = q.submit({}, 4)
    c = claim_one(q)
    q.start(c, "h:1")
    assert not q.is_cancelled(job.id)
    got = q.cancel(job.id)
    assert got is not None and got.status is JobStatus.running  # the worker ends it
    assert q.is_cancelled(job.id) and q.cancelled([job.id, "other"]) == {job.id}
    q.publish_frame(job.id, 0, PNG)
    assert q.finish(c, JobStatus.cancelled)
    assert q.get(job.id).status is JobStatus.cancelled  # type: ignore[union-attr]
    assert not q.is_cancelled(job.id)  # the flag goes with the job
    assert [e.type for e in q.events(job.id)] == ["started", "frame", "done"]


def test_cancel_flag_of_dead_worker_is_honoured_on_reclaim(make_queue: MakeQueue) -> None:
    q = make_queue(lease_ms=100)
    job = q.submit({}, 4)
    q.start(claim_one(q, "w1"), "h:1")
    q.cancel(job.id)
    time.sleep(0.25)  # w1 died without seeing the flag
    assert q.claim("w2", 1, 0) == []
    assert q.get(job.id).status is JobStatus.cancelled  # type: ignore[union-attr]


def test_reclaim_after_lease_expiry(make_queue: MakeQueue) -> None:
    q = make_queue(lease_ms=200)
    job = q.submit({}, 4)
    c1 = claim_one(q, "w1")
    q.start(c1, "h:1")
    q.publish_frame(job.id, 0, PNG)
    assert q.claim("w2", 1, 0) == []  # the lease still holds
    time.sleep(0.3)
    c2 = claim_one(q, "w2")
    assert (c2.id, c2.deliveries, c2.frames_done) == (job.id, 2, 1)
    assert q.start(c2, "h:2")
    got = q.get(job.id)
    assert got is not None and (got.status, got.worker, got.deliveries) == (
        JobStatus.running, "h:2", 2)
    assert got.notes == ("run 2 on h:2",)
    assert [e.type for e in q.events(job.id)].count("started") == 1
    assert q.renew("w1", [c1]) == [job.id]  # w1 learns it lost the job
    assert q.renew("w2", [c2]) == []


def test_renew_keeps_the_lease(make_queue: MakeQueue) -> None:
    q = make_queue(lease_ms=500)
    q.submit({}, 1)
    c = claim_one(q, "w1")
    for _ in range(8):  # 0.8 s in all, well past the lease
        time.sleep(0.1)
        assert q.renew("w1", [c]) == []
        assert q.claim("w2", 1, 0) == []
    assert q.renew("w1", []) == []


def test_dead_letter_after_max_deliveries(make_queue: MakeQueue) -> None:
    q = make_queue(lease_ms=100, max_deliveries=2)
    job = q.submit({}, 2)
    for n, consumer in enumerate(["w1", "w2"], start=1):
        c = claim_one(q, consumer)
        assert c.deliveries == n
        q.start(c, f"h:{n}")
        time.sleep(0.2)  # the worker dies: its lease runs out
    assert q.claim("w3", 1, 0) == []
    got = q.get(job.id)
    assert got is not None and got.status is JobStatus.failed
    assert got.error is not None and got.error.startswith("gave up after 2 deliveries: ")
    assert "h:2" in got.error
    dead = q.redis.xrange(q.keys.dead)
    assert len(dead) == 1 and dead[0][1][b"id"] == job.id.encode()
    assert b"lease" in dead[0][1][b"reason"] and dead[0][1][b"deliveries"] == b"2"
    assert q.events(job.id)[-1].status is JobStatus.failed
    assert q.redis.xpending(q.keys.jobs, "workers")["pending"] == 0
    assert q.claim("w3", 1, 0) == []


def test_release_makes_job_claimable_at_once(q: Queue) -> None:  # default 30 s lease
    first, second = q.submit({}, 3), q.submit({}, 3)
    c = claim_one(q, "w1")
    q.start(c, "h:1")
    q.publish_frame(first.id, 0, PNG)
    assert q.get(second.id).queue_position == 0  # type: ignore[union-attr]
    q.release("w1", [c])
    got = q.get(first.id)
    assert got is not None and (got.status, got.queue_position, got.worker) == (
        JobStatus.queued, 0, None)  # back at its old place in line
    assert got.notes == ("released by w1",)
    c2 = claim_one(q, "w2")
    assert (c2.id, c2.deliveries, c2.frames_done) == (first.id, 1, 1)  # not a failed delivery
    assert q.start(c2, "h:2")
    assert q.renew("w1", [c]) == [first.id]
    q.release("w1", [c])  # releasing a job one no longer owns does nothing
    assert q.get(first.id).status is JobStatus.running  # type: ignore[union-attr]


def test_publish_frame_idempotent_across_rerun(make_queue: MakeQueue) -> None:
    q = make_queue(lease_ms=100)
    job = q.submit({}, 4)
    c1 = claim_one(q, "w1")
    q.start(c1, "h:1")
    assert [q.publish_frame(job.id, i, PNG + b"a") for i in range(2)] == [True, True]
    time.sleep(0.2)  # w1 crashes after two frames
    c2 = claim_one(q, "w2")
    assert c2.frames_done == 2
    q.start(c2, "h:2")
    assert [q.publish_frame(job.id, i, PNG + b"b") for i in range(4)] == [
        False, False, True, True]
    assert not q.publish_frame(job.id, 3, PNG + b"a")  # the stale worker is refused too
    q.finish(c2, JobStatus.succeeded, video=b"v")
    frames = [e for e in q.events(job.id) if e.type == "frame"]
    assert [(e.index, e.png) for e in frames] == [
        (0, PNG + b"a"), (1, PNG + b"a"), (2, PNG + b"b"), (3, PNG + b"b")]
    assert q.get(job.id).frames_done == 4  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        q.publish_frame(job.id, -1, PNG)


def test_events_resume(q: Queue) -> None:
    job = q.submit({}, 5)
    c = claim_one(q)
    q.start(c, "h:1")
    for i in range(3):
        q.publish_frame(job.id, i, PNG)
    assert [e.index for e in q.events(job.id, after_index=0)] == [1, 2]
    for i in range(3, 5):
        q.publish_frame(job.id, i, PNG)
    q.finish(c, JobStatus.succeeded)
    assert [(e.type, e.index) for e in q.events(job.id, after_index=2)] == [
        ("frame", 3), ("frame", 4), ("done", None)]
    assert [e.type for e in q.events(job.id, after_index=4)] == ["done"]
    assert len(q.events(job.id, count=2)) == 2
    # A polling loop follows the event-id cursor: every event exactly once.
    seen: list[Event] = []
    cursor = None
    while not seen or seen[-1].type != "done":
        batch = q.events(job.id, after_id=cursor, count=2)
        seen += batch
        cursor = batch[-1].id
    assert [e.index for e in seen] == [None, 0, 1, 2, 3, 4, None]
    assert q.events(job.id, after_id=cursor, block_ms=50) == []


def test_blocking_events_wake_on_publish(q: Queue) -> None:
    job = q.submit({}, 2)
    c = claim_one(q)
    q.start(c, "h:1")
    started = q.events(job.id)
    t0 = time.monotonic()
    later(0.3, lambda: q.publish_frame(job.id, 0, PNG))
    got = q.events(job.id, after_id=started[-1].id, block_ms=10_000)
    assert [e.index for e in got] == [0] and time.monotonic() - t0 < 5
    later(0.2, lambda: q.finish(c, JobStatus.succeeded))
    got = q.events(job.id, after_index=0, block_ms=10_000)
    assert [e.type for e in got] == ["done"]


def test_blocking_claim_wakes_on_submit(q: Queue) -> None:
    t0 = time.monotonic()
    assert q.claim("w", 1, 300) == []  # times out empty, after really waiting
    assert q.claim("w", 0, 0) == []
    assert time.monotonic() - t0 >= 0.25
    holder: dict[str, str] = {}
    t0 = time.monotonic()
    submitter = later(0.3, lambda: holder.setdefault("id", q.submit({}, 1).id))
    c = claim_one(q, "w", block_ms=10_000)
    waited = time.monotonic() - t0
    submitter.join()  # the claim may wake before submit() has returned the id
    assert c.id == holder["id"] and waited < 5


def test_embedded_worker_thread(q: Queue) -> None:
    """API threads submit and read while a worker thread claims and runs (embedded mode)."""
    stop, n_jobs = threading.Event(), 12

    def worker() -> None:
        while not stop.is_set():
            for c in q.claim("w", 4, 100):
                if q.start(c, "h:w"):
                    for i in range(c.frames_total):
                        q.publish_frame(c.id, i, PNG)
                    q.finish(c, JobStatus.succeeded, video=c.id.encode())

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    ids: list[str] = []
    submitters = [threading.Thread(target=lambda: ids.append(q.submit({}, 3).id))
                  for _ in range(n_jobs)]
    for s in submitters:
        s.start()
    for s in submitters:
        s.join()
    for job_id in ids:
        events: list[Event] = []
        while not events or events[-1].type != "done":
            events += q.events(job_id, after_id=events[-1].id if events else None,
                               block_ms=5000)
        assert [e.index for e in events if e.type == "frame"] == [0, 1, 2]
        assert q.video(job_id) == job_id.encode()
    stop.set()
    t.join(timeout=5)
    assert len(set(ids)) == n_jobs and q.queued_count() == 0


def test_ttls(make_queue: MakeQueue) -> None:
    q = make_queue(job_ttl_s=600)
    job = q.submit({}, 1, idempotency_key="k")
    assert q.redis.ttl(q.keys.job(job.id)) > 600  # generous while live, never unbounded
    assert q.redis.ttl(q.keys.idem(None, "k")) > 600
    c = claim_one(q)
    q.start(c, "h:1")
    assert q.redis.ttl(q.keys.events(job.id)) > 600
    q.publish_frame(job.id, 0, PNG)
    q.finish(c, JobStatus.succeeded, video=b"v")
    for key in (q.keys.job(job.id), q.keys.events(job.id), q.keys.video(job.id),
                q.keys.idem(None, "k")):
        assert 0 < q.redis.ttl(key) <= 600, key
    assert q.redis.ttl(q.keys.jobs) == -1  # the shared stream never expires


def test_worker_heartbeats(q: Queue) -> None:
    assert q.workers() == []
    q.heartbeat("gpu-0", {"device": "cuda", "batch": 3}, ttl_s=30)
    q.heartbeat("gpu-1", {"device": "cpu"}, ttl_s=0.2)
    live = {w["name"]: w for w in q.workers()}
    assert set(live) == {"gpu-0", "gpu-1"} and live["gpu-0"]["batch"] == 3
    assert live["gpu-0"]["last_seen"] <= time.time()
    time.sleep(0.3)
    assert [w["name"] for w in q.workers()] == ["gpu-0"]
    q.forget_worker("gpu-0")
    assert q.workers() == []


def test_next_slot_is_the_soonest_finish_at_each_jobs_own_pace(q: Queue) -> None:
    """Retry-After's source: time per frame so far x frames left, the smallest over live jobs."""
    slow, fast = q.submit({}, 10), q.submit({}, 4)
    claimed = q.claim("w", 2, 0)
    assert q.next_slot_s() is None  # no live worker holds a job
    q.heartbeat("w", {"jobs": [slow.id, fast.id]}, ttl_s=30)
    for c in claimed:
        q.start(c, "h:1")
    assert q.next_slot_s() is None  # running, but no frame made yet to go by
    now = time.time()
    q.redis.hset(q.keys.job(slow.id), "started_at", repr(now - 20))  # 2 frames in 20 s: 80 s left
    q.redis.hset(q.keys.job(fast.id), "started_at", repr(now - 3))  # 1 frame in 3 s: 9 s left
    q.publish_frame(slow.id, 1, PNG)
    q.publish_frame(fast.id, 0, PNG)
    assert q.next_slot_s() == pytest.approx(9, abs=0.5)


def test_ping() -> None:
    assert Queue(fakeredis.FakeRedis(server=fakeredis.FakeServer())).ping()
    t0 = time.monotonic()
    dead = redis.Redis(port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    assert not Queue(dead).ping()  # constructing it and pinging it raise nothing
    assert time.monotonic() - t0 < 10


def test_group_recreated_after_flush(q: Queue) -> None:
    q.submit({}, 1)
    held = claim_one(q)
    q.redis.delete(q.keys.jobs)  # e.g. Redis restarted without persistence
    assert q.renew("w1", [held]) == [held.id]  # the worker learns its lease is gone
    q.redis.delete(q.keys.jobs)
    assert q.claim("w", 1, 0) == []
    job = q.submit({}, 1)
    assert claim_one(q).id == job.id
