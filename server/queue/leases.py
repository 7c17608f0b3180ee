"""Leases: how workers claim jobs from the stream, hold them while they run, lose them when
they die, and hand them back on shutdown.

A claimed job is a pending entry of the consumer group. The lease is the entry's idle time:
a worker renews it by XCLAIMing its entries to itself; an entry idle longer than lease_ms
is XAUTOCLAIMed by the next worker that claims (at-least-once). Delivery counts come from
XPENDING; past max_deliveries the job is dead-lettered and failed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import redis

from dfserve.server.queue.keys import GROUP, STARTED_ID
from dfserve.server.queue.lifecycle import Lifecycle
from dfserve.server.queue.records import ClaimedJob, Job, JobStatus, add_note, is_live, text

log = logging.getLogger(__name__)

DEAD_MAXLEN = 10_000  # the dead-letter stream is capped (approximately)

Entry = tuple[bytes, dict[bytes, bytes]]  # a job-stream entry: (entry id, {b"id": job id})


class Leases(Lifecycle):
    """The worker's side of the queue: claim, start, renew, release."""

    def claim(self, consumer: str, count: int, block_ms: int = 0) -> list[ClaimedJob]:
        """Up to `count` runnable jobs: first ones whose lease expired, then new ones.

        Cancelled/finished jobs are acked and skipped; jobs delivered more than max_deliveries
        times are dead-lettered and failed. block_ms <= 0 never blocks.
        """
        if count <= 0:
            return []
        try:
            entries = self._reclaim(consumer, count)
        except redis.ResponseError as e:
            self._recreate_group(e)
            entries = []
        if len(entries) < count:
            block = block_ms if block_ms > 0 and not entries else 0
            entries += [(eid, f, 1) for eid, f in self._read_new(consumer, count - len(entries),
                                                                 block)]
        claimed = (self._admit(text(eid), text(f.get(b"id")), n) for eid, f, n in entries)
        return [c for c in claimed if c is not None]

    def _read_new(self, consumer: str, count: int, block_ms: int) -> list[Entry]:
        """XREADGROUP never-delivered entries, waiting up to block_ms for one."""
        if block_ms <= 0 or not self._fake:
            return self._xreadgroup(consumer, count, block_ms or None)
        # fakeredis (2.40) answers XREADGROUP BLOCK with COUNT at once, empty, so a worker would
        # spin. Its blocking XREAD works across threads: wait on it for an entry newer than the
        # stream's top one (read before XREADGROUP, so no wake-up is lost), then read again.
        deadline = time.monotonic() + block_ms / 1000
        while True:
            top = self.redis.xrevrange(self.keys.jobs, "+", "-", count=1)
            got = self._xreadgroup(consumer, count, None)
            left_ms = int((deadline - time.monotonic()) * 1000)
            if got or left_ms <= 0:
                return got
            self.redis.xread({self.keys.jobs: top[0][0] if top else "0-0"}, count=1,
                             block=left_ms)

    def _xreadgroup(self, consumer: str, count: int, block: int | None) -> list[Entry]:
        try:
            reply = self.redis.xreadgroup(GROUP, consumer, {self.keys.jobs: ">"}, count=count,
                                          block=block)
        except redis.ResponseError as e:
            self._recreate_group(e)
            return []
        return list(reply[0][1]) if reply else []

    def _reclaim(self, consumer: str, count: int) -> list[tuple[bytes, dict[bytes, bytes], int]]:
        """XAUTOCLAIM entries idle > lease_ms, with their delivery counts (from XPENDING)."""
        out: list[tuple[bytes, dict[bytes, bytes], int]] = []
        cursor: bytes | str = "0-0"
        for _ in range(100):  # bounded walk over the pending entries list
            reply = self.redis.xautoclaim(self.keys.jobs, GROUP, consumer, self.lease_ms,
                                          cursor, count=count - len(out))
            cursor, got = reply[0], reply[1]
            for eid, f in got:
                info = self.redis.xpending_range(self.keys.jobs, GROUP, eid, eid, 1)
                out.append((eid, f, int(info[0]["times_delivered"]) if info else 1))
            if len(out) >= count or text(cursor) == "0-0":
                break
        return out

    def _admit(self, entry_id: str, job_id: str, deliveries: int) -> ClaimedJob | None:
        job = self.get(job_id)
        if job is None or job.status.terminal:
            log.info("skipping job %s: %s", job_id, job.status.value if job else "expired")
            self._ack(self.redis.pipeline(), entry_id).execute()
            return None
        if self.is_cancelled(job_id):
            self._finalize(job_id, entry_id, JobStatus.cancelled)
            return None
        if deliveries > self.max_deliveries:
            self._dead_letter(job, entry_id, deliveries)
            return None
        self.redis.hset(self.keys.job(job_id), "deliveries", deliveries)
        if deliveries > 1:
            log.warning("job %s re-delivered (delivery %d, last worker %s)",
                        job_id, deliveries, job.worker)
        return ClaimedJob(job_id, entry_id, deliveries, job.params, job.frames_total,
                          job.frames_done)

    def _dead_letter(self, job: Job, entry_id: str, deliveries: int) -> None:
        reason = f"its worker stopped renewing the lease (last worker: {job.worker or '?'})"
        error = f"gave up after {deliveries - 1} deliveries: {reason}"
        self.redis.xadd(self.keys.dead, {"id": job.id, "entry": entry_id, "reason": reason,
                                         "deliveries": deliveries - 1, "at": repr(time.time())},
                        maxlen=DEAD_MAXLEN, approximate=True)
        self._finalize(job.id, entry_id, JobStatus.failed, error=error)
        log.error("job %s dead-lettered: %s", job.id, error)

    def start(self, job: ClaimedJob, worker: str) -> bool:
        """Mark running on `worker` (host:pid). False if the job ended meanwhile (then acked):
        the worker must not run it."""
        key = self.keys.job(job.id)

        def txn(pipe: Any) -> bool:
            h = pipe.hgetall(key)
            if not is_live(h):
                pipe.multi()
                self._ack(pipe, job.entry_id)
                return False
            first = not h.get(b"started_at")
            fields: dict[str, Any] = {"status": JobStatus.running.value, "worker": worker}
            pipe.multi()
            if first:
                fields["started_at"] = repr(time.time())
                pipe.xadd(self.keys.events(job.id), {"type": "started", "status": "running",
                                                     "data": json.dumps({"worker": worker})},
                          id=STARTED_ID)
            else:  # a re-run after a crash, lease loss or release
                fields["notes"] = add_note(h, f"run {job.deliveries} on {worker}")
            pipe.hset(key, mapping=fields)
            pipe.zrem(self.keys.queued, job.id)
            pipe.expire(self.keys.events(job.id), self._pending_ttl_s)
            return True

        return bool(self.redis.transaction(txn, key, value_from_callable=True))

    def renew(self, consumer: str, jobs: Sequence[ClaimedJob]) -> list[str]:
        """Extend the leases of jobs this consumer still owns; returns the ids of jobs it lost
        (reclaimed by another worker, or acked): the worker must drop those."""
        owned = self._owned(consumer, jobs)
        held = [j.entry_id for j, own in zip(jobs, owned, strict=True) if own]
        if held:  # XCLAIM to the same consumer resets the idle time; JUSTID keeps the count
            self.redis.xclaim(self.keys.jobs, GROUP, consumer, 0, held, justid=True)
        return [j.id for j, own in zip(jobs, owned, strict=True) if not own]

    def _owned(self, consumer: str, jobs: Sequence[ClaimedJob]) -> list[bool]:
        pipe = self.redis.pipeline(transaction=False)
        for j in jobs:
            pipe.xpending_range(self.keys.jobs, GROUP, j.entry_id, j.entry_id, 1,
                                consumername=consumer)
        try:
            return [bool(r) for r in pipe.execute()]
        except redis.ResponseError as e:  # no group: every lease is gone
            self._recreate_group(e)
            return [False] * len(jobs)

    def release(self, consumer: str, jobs: Sequence[ClaimedJob]) -> None:
        """Hand jobs back on graceful shutdown: queued again, at their old place in line,
        claimable at once by any worker (XCLAIM IDLE lease_ms makes XAUTOCLAIM take them).
        The hand-back does not count as a failed delivery (RETRYCOUNT deliveries - 1)."""
        for job, own in zip(jobs, self._owned(consumer, jobs), strict=True):
            if own:
                self._release_one(consumer, job)

    def _release_one(self, consumer: str, job: ClaimedJob) -> None:
        key = self.keys.job(job.id)

        def txn(pipe: Any) -> None:
            h = pipe.hgetall(key)
            pipe.multi()
            if not is_live(h):
                self._ack(pipe, job.entry_id)
                return
            pipe.hset(key, mapping={"status": JobStatus.queued.value, "worker": "",
                                    "notes": add_note(h, f"released by {consumer}")})
            pipe.zadd(self.keys.queued, {job.id: int(h[b"seq"])})
            pipe.xclaim(self.keys.jobs, GROUP, consumer, 0, [job.entry_id], idle=self.lease_ms,
                        retrycount=max(job.deliveries - 1, 0), justid=True)

        self.redis.transaction(txn, key)
        log.info("released job %s", job.id)
