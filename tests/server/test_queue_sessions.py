"""server/queue/sessions.py: a session's keys on a fakeredis queue (its action stream, the
cursor a worker reads it from, its TTL once the session ends)."""

from __future__ import annotations

import time

import fakeredis

from dfserve.server.queue import JobStatus, Queue


def test_queue_session_keys() -> None:
    q = Queue(fakeredis.FakeRedis(server=fakeredis.FakeServer()), job_ttl_s=60)
    job = q.submit_session({"model": "tiny"})
    assert job.params["kind"] == "session" and job.frames_total == 0
    assert q.read_actions({job.id: "0-0"}) == {}
    assert q.push_actions(job.id, [1, 2]) == 2 and q.push_actions(job.id, [3]) == 3
    new = q.read_actions({job.id: "0-0", "other": "0-0"})
    actions, cursor = new[job.id]
    assert actions == [1, 2, 3] and set(new) == {job.id}
    assert q.read_actions({job.id: cursor}) == {}
    t0 = time.monotonic()
    assert q.read_actions({job.id: cursor}, block_ms=100) == {}
    assert time.monotonic() - t0 >= 0.09  # waited
    assert q.get(job.id).frames_total == 3
    q.cancel(job.id)  # queued: ends at once, and the action stream gets the job TTL
    assert q.get(job.id).status is JobStatus.cancelled
    assert 0 < q.redis.ttl(q.keys.actions(job.id)) <= 60
