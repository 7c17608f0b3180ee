"""All Redis knowledge of dfserve: key names, jobs, leases, frame streams, results.

The API and the worker share one synchronous `Queue` over a synchronous client: `redis.Redis`
in production, `fakeredis.FakeRedis(server=...)` in embedded mode (API threads and a worker
thread on one in-process server). The client must use `decode_responses=False` (frames and
videos are raw bytes) and RESP2 (the default). No Lua: fakeredis would need lupa, so the
read-modify-write steps are optimistic WATCH/MULTI transactions.

Keys, under a prefix `p`:
    p:jobs              stream of job entries {id}, consumer group "workers" (at-least-once)
    p:seq               INCR counter giving each job its place in line
    p:queued            zset of queued job ids scored by seq; ZRANK = queue position
    p:job:{id}          hash: status, params (JSON), owner, timestamps, progress, notes, ...
    p:events:{id}       stream: started, frame 0..n-1, done (see "Event ids" below)
    p:video:{id}        the MP4 bytes
    p:cancel:{id}       cancel flag for a running job
    p:actions:{id}      stream of action batches of an interactive session ({"a": JSON ints})
    p:idem:{owner}:{k}  idempotency key -> job id (SET NX)
    p:owned:{owner}     zset of an owner's rollout ids scored by seq (GET /v1/rollouts)
    p:dead              dead-letter stream
    p:worker:{name}     worker heartbeat JSON (TTL); p:workers indexes the names (no SCAN)
    p:stats             hash of counters for /metrics: submitted, finished:{status}, frames

Event ids. Each job's event stream uses explicit ids instead of `*`:
    started = 0-1, frame i = (i+1)-0, done = (max(frames_total, frames_done)+1)-1.
Redis refuses an XADD whose id is not above the top one, which gives three guarantees for
free and atomically, across racing workers: a frame index is published at most once (a
re-run after a crash, or a stale worker that lost its lease, is refused); nothing is
appended after `done`; and "everything after frame k" is simply the id range above (k+1)-0,
so a reconnecting client resumes from the last frame index it saw.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import redis

log = logging.getLogger(__name__)

GROUP = "workers"
PENDING_TTL_S = 7 * 86_400  # TTL while a job is live: generous, but nothing is orphaned forever
DEAD_MAXLEN = 10_000  # the dead-letter stream is capped (approximately)
MAX_INDEX = 2**62  # frame indexes beyond this cannot exist (stream ids are 64-bit)
MAX_OWNED = 10_000  # GET /v1/rollouts lists at most this many of an owner's newest jobs


class JobStatus(StrEnum):
    """Lifecycle of a rollout job; the API returns the value as is."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class QueueFull(Exception):
    """Raised by `submit` when `max_queued` jobs are already waiting (the API answers 429)."""

    def __init__(self, queued: int, limit: int) -> None:
        super().__init__(f"queue is full: {queued} jobs queued (limit {limit})")
        self.queued, self.limit = queued, limit


@dataclass(frozen=True)
class Job:
    """A snapshot of a job's hash. `queue_position` is 0 for the next job to run."""

    id: str
    status: JobStatus
    params: dict[str, Any]
    frames_total: int
    frames_done: int
    owner: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    worker: str | None
    deliveries: int
    notes: tuple[str, ...]
    queue_position: int | None
    seq: int = 0  # place in line at submission: orders an owner's jobs (list_jobs)


@dataclass(frozen=True)
class ClaimedJob:
    """A job handed to a worker. `frames_done` frames were already published by an earlier run."""

    id: str
    entry_id: str
    deliveries: int
    params: dict[str, Any]
    frames_total: int
    frames_done: int


@dataclass(frozen=True)
class Event:
    """One entry of a job's event stream. `id` is an opaque cursor for `events(after_id=...)`."""

    id: str
    type: str  # "started" | "frame" | "done"
    index: int | None = None  # frames only
    png: bytes | None = None  # frames only
    status: JobStatus | None = None  # control events only
    data: dict[str, Any] = field(default_factory=dict)  # control events: error, worker, ...


def _s(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


def _opt_float(value: bytes | None) -> float | None:
    return float(value) if value else None


class Keys:
    """Key names under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.jobs, self.seq, self.queued, self.dead, self.workers, self.stats = (
            f"{prefix}:{name}" for name in ("jobs", "seq", "queued", "dead", "workers", "stats"))

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:events:{job_id}"

    def video(self, job_id: str) -> str:
        return f"{self.prefix}:video:{job_id}"

    def cancel(self, job_id: str) -> str:
        return f"{self.prefix}:cancel:{job_id}"

    def actions(self, job_id: str) -> str:
        return f"{self.prefix}:actions:{job_id}"

    def idem(self, owner: str | None, key: str) -> str:
        return f"{self.prefix}:idem:{owner or '-'}:{key}"

    def worker(self, name: str) -> str:
        return f"{self.prefix}:worker:{name}"

    def owned(self, owner: str | None) -> str:
        return f"{self.prefix}:owned:{owner or '-'}"


class Queue:
    """The job queue, shared by API threads and worker(s); thread-safe (no mutable state)."""

    def __init__(self, redis_client: redis.Redis, prefix: str = "dfserve", lease_ms: int = 30_000,
                 max_deliveries: int = 3, job_ttl_s: int = 86_400, max_queued: int = 1000) -> None:
        # Typed Any: redis-py's stubs type every reply as a union over sync/async clients and
        # RESP2/RESP3 shapes; this module knows the RESP2 shapes and decodes them itself.
        self.redis: Any = redis_client
        self.keys = Keys(prefix)
        self.lease_ms, self.max_deliveries = lease_ms, max_deliveries
        self.job_ttl_s, self.max_queued = job_ttl_s, max_queued
        self._pending_ttl_s = max(PENDING_TTL_S, job_ttl_s)
        self._fake = type(redis_client).__module__.startswith("fakeredis")
        try:
            self._ensure_group()
        except redis.ConnectionError as e:  # the API must start (and say "not ready") anyway
            log.warning("Redis unreachable (%s); the consumer group is made on first claim", e)

    def _ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(self.keys.jobs, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    # ---------------------------------------------------------------- API side

    def submit(self, params: dict[str, Any], frames_total: int, owner: str | None = None,
               idempotency_key: str | None = None) -> Job:
        """Enqueue a job; a repeated (owner, idempotency_key) returns the existing job instead."""
        if frames_total < 1:
            raise ValueError(f"frames_total must be >= 1, got {frames_total}")
        idem = self.keys.idem(owner, idempotency_key) if idempotency_key else ""
        if idem and (existing := self._idem_job(idem)):
            return existing
        queued = self.queued_count()  # a soft limit: racing submits may overshoot it slightly
        if queued >= self.max_queued:
            raise QueueFull(queued, self.max_queued)
        job_id, seq = uuid.uuid4().hex, int(self.redis.incr(self.keys.seq))
        # The hash exists before the idempotency key points at it, so a racing duplicate that
        # loses SET NX always finds a readable job.
        fields = {"status": JobStatus.queued.value, "params": json.dumps(params),
                  "owner": owner or "", "created_at": repr(time.time()), "started_at": "",
                  "finished_at": "", "frames_done": 0, "frames_total": frames_total,
                  "error": "", "worker": "", "deliveries": 0, "notes": "[]", "seq": seq,
                  "idem": idem}
        pipe = self.redis.pipeline()
        pipe.hset(self.keys.job(job_id), mapping=fields)
        pipe.expire(self.keys.job(job_id), self._pending_ttl_s)
        pipe.execute()
        if idem and not self.redis.set(idem, job_id, nx=True, ex=self._pending_ttl_s):
            self.redis.delete(self.keys.job(job_id))
            if existing := self._idem_job(idem):
                return existing
            # The key points at a job that expired: take it over (a rare, benign race).
            self.redis.set(idem, job_id, ex=self._pending_ttl_s)
            self.redis.hset(self.keys.job(job_id), mapping=fields)
            self.redis.expire(self.keys.job(job_id), self._pending_ttl_s)
        pipe = self.redis.pipeline()
        pipe.zadd(self.keys.queued, {job_id: seq})
        pipe.xadd(self.keys.jobs, {"id": job_id})
        pipe.hincrby(self.keys.stats, "submitted", 1)
        if params.get("kind") != "session":  # sessions are not listed as rollouts
            self._index_owned(pipe, owner, job_id, seq)
        pipe.execute()
        log.info("queued job %s (%d frames, owner %s)", job_id, frames_total, owner or "-")
        job = self.get(job_id)
        assert job is not None
        return job

    def _index_owned(self, pipe: Any, owner: str | None, job_id: str, seq: int) -> None:
        # The index outlives no job by much: it expires with the newest job's pending TTL,
        # and `list_jobs` drops ids whose hash has expired.
        key = self.keys.owned(owner)
        pipe.zadd(key, {job_id: seq})
        pipe.zremrangebyrank(key, 0, -MAX_OWNED - 1)
        pipe.expire(key, self._pending_ttl_s)

    def list_jobs(self, owner: str | None, limit: int, before: int | None = None
                  ) -> tuple[list[Job], int | None]:
        """An owner's rollouts, newest first: up to `limit` jobs submitted before the job
        whose seq is `before` (None: from the newest), and the cursor of the next page (the
        seq of the last job returned; None on the last page)."""
        key = self.keys.owned(owner)
        top = f"({before}" if before is not None else "+inf"
        jobs: list[Job] = []
        while True:
            want = limit + 1 - len(jobs)  # one more than the page: is there a next one?
            rows = self.redis.zrevrangebyscore(key, top, "-inf", start=0, num=want,
                                               withscores=True)
            found = [(raw_id, self.get(_s(raw_id))) for raw_id, _ in rows]
            if gone := [raw_id for raw_id, job in found if job is None]:
                self.redis.zrem(key, *gone)  # expired jobs leave the index as they are met
            jobs += [job for _, job in found if job is not None]
            if len(jobs) > limit:
                return jobs[:limit], jobs[limit - 1].seq
            if len(rows) < want:
                return jobs, None
            top = f"({int(rows[-1][1])}"

    def _idem_job(self, idem: str) -> Job | None:
        job_id = self.redis.get(idem)
        return self.get(_s(job_id)) if job_id else None

    def get(self, job_id: str) -> Job | None:
        """The job's current state, or None if unknown or expired."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.keys.job(job_id))
        pipe.zrank(self.keys.queued, job_id)
        h, rank = pipe.execute()
        return _parse_job(job_id, h, rank) if h else None

    def cancel(self, job_id: str) -> Job | None:
        """Cancel: a queued job ends now and never runs; a running one gets the cancel flag."""
        job = self.get(job_id)
        if job is None or job.status.terminal:
            return job
        if job.status is JobStatus.running:
            self.redis.set(self.keys.cancel(job_id), 1, ex=self._pending_ttl_s)
            # It may have ended between our read and the flag (finalize deletes the flag, so
            # only this order can leave one behind): clear the flag of a finished job.
            after = self.get(job_id)
            if after is None or after.status.terminal:
                self.redis.delete(self.keys.cancel(job_id))
            log.info("cancel requested for running job %s", job_id)
        elif not self._finalize(job_id, None, JobStatus.cancelled, expect=JobStatus.queued):
            return self.cancel(job_id)  # it started meanwhile: flag it instead
        return self.get(job_id)

    def events(self, job_id: str, after_index: int = -1, block_ms: int = 0,
               after_id: str | None = None, count: int | None = None) -> list[Event]:
        """Frames with index > after_index, and the control events after them, in order.

        A client that saw frames up to k resumes with after_index=k and gets every later frame
        exactly once, then `done`. A polling loop should pass `after_id` = the last event's id
        instead, so control events after the last frame are not repeated. With block_ms > 0
        and nothing new, waits up to block_ms for the next event (XREAD BLOCK).
        """
        start = after_id or events_cursor(after_index)
        key = self.keys.events(job_id)
        entries = self.redis.xrange(key, f"({start}", "+", count=count)
        if not entries and block_ms > 0:
            reply = self.redis.xread({key: start}, count=count, block=block_ms)
            entries = reply[0][1] if reply else []
        return [_parse_event(eid, f) for eid, f in entries]

    def newest_events(self, cursors: dict[str, str], block_ms: int) -> dict[str, str]:
        """Job id -> the id of an event after its cursor, for the jobs that have one; with
        none, waits up to block_ms (one XREAD over every job). COUNT 1: this is a wake-up for
        the API's event hub (server/streams.py), not the frames, which readers fetch with
        `events` from their own cursors."""
        if not cursors:
            return {}
        streams = {self.keys.events(j): c for j, c in cursors.items()}
        reply = self.redis.xread(streams, count=1, block=max(block_ms, 1))
        prefix = len(self.keys.events(""))
        return {_s(key)[prefix:]: _s(entries[-1][0]) for key, entries in reply or [] if entries}

    def positions(self, job_ids: list[str]) -> dict[str, int | None]:
        """Each job's queue position (None when it is not queued), in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.zrank(self.keys.queued, job_id)
        return dict(zip(job_ids, pipe.execute() if job_ids else [], strict=True))

    def standing(self, job_id: str) -> tuple[bool, int | None]:
        """(the job exists, its queue position or None when not queued) in one cheap round
        trip: what an open stream polls while nothing happens (`get` reads the whole job)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.exists(self.keys.job(job_id))
        pipe.zrank(self.keys.queued, job_id)
        exists, rank = pipe.execute()
        return bool(exists), rank

    def frame_png(self, job_id: str, index: int) -> bytes | None:
        """The PNG of one published frame."""
        eid = f"{index + 1}-0"
        entries = (self.redis.xrange(self.keys.events(job_id), eid, eid)
                   if 0 <= index <= MAX_INDEX else [])
        return entries[0][1].get(b"png") if entries else None

    def video(self, job_id: str) -> bytes | None:
        """The finished MP4, if stored."""
        return self.redis.get(self.keys.video(job_id))

    # ------------------------------------------------------------- sessions
    # An interactive session (WS /v1/sessions) is a job like a rollout (params["kind"] ==
    # "session"): same stream, claim, lease, cancel flag and event stream. It starts with no
    # frames to make; the API appends actions to p:actions:{id} and raises frames_total, and
    # the worker that holds the session reads them between rows (`read_actions`). A re-run
    # after a crash replays the whole action stream from the stored seed; frames already
    # published are refused by the event-id scheme, so clients see each frame once.

    def submit_session(self, params: dict[str, Any], owner: str | None = None) -> Job:
        """Enqueue a session job (frames_total 0 until actions arrive)."""
        job = self.submit({**params, "kind": "session"}, 1, owner)
        self.redis.hset(self.keys.job(job.id), "frames_total", 0)
        return self.get(job.id) or job

    def push_actions(self, job_id: str, actions: Sequence[int]) -> int:
        """Append actions (one frame each) to a session; returns the new frames_total."""
        key = self.keys.actions(job_id)
        pipe = self.redis.pipeline()
        pipe.xadd(key, {"a": json.dumps([int(a) for a in actions])})
        pipe.expire(key, self._pending_ttl_s)
        pipe.hincrby(self.keys.job(job_id), "frames_total", len(actions))
        return int(pipe.execute()[-1])

    def read_actions(self, cursors: dict[str, str], block_ms: int = 0
                     ) -> dict[str, tuple[list[int], str]]:
        """New actions of sessions, session id -> (actions, new cursor), for the sessions that
        have some after their cursor ("0-0" at first). With block_ms > 0 and nothing new,
        waits up to block_ms for any of them (XREAD BLOCK)."""
        if not cursors:
            return {}
        streams = {self.keys.actions(i): c for i, c in cursors.items()}
        reply = self.redis.xread(streams, block=block_ms if block_ms > 0 else None)
        out: dict[str, tuple[list[int], str]] = {}
        prefix = len(self.keys.actions(""))
        for key, entries in reply or []:
            actions = [a for _, f in entries for a in json.loads(f[b"a"])]
            out[_s(key)[prefix:]] = (actions, _s(entries[-1][0]))
        return out

    def next_slot_s(self) -> float | None:
        """Seconds until a running job is likely to end and free a slot (what a 429's
        Retry-After says): the soonest finish of the live jobs at their own pace so far
        (time per frame since they started x frames left); None when no live job has made
        a frame yet to go by."""
        ids = [j for w in self.workers() for j in w.get("jobs", [])]
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(self.keys.job(job_id), "status", "started_at", "frames_done",
                       "frames_total")
        now, guesses = time.time(), []
        for status, started, done, total in pipe.execute() if ids else []:
            if _s(status) != JobStatus.running.value or not started or not done:
                continue
            done_n, total_n = int(done), int(total)
            if done_n > 0:
                guesses.append((now - float(started)) / done_n * max(total_n - done_n, 0))
        return min(guesses) if guesses else None

    def queued_count(self) -> int:
        return int(self.redis.zcard(self.keys.queued))

    def workers(self) -> list[dict[str, Any]]:
        """Live workers: their last heartbeat info plus `name` and `last_seen` (epoch s)."""
        self.redis.zremrangebyscore(self.keys.workers, "-inf", time.time())
        names = [_s(n) for n in self.redis.zrange(self.keys.workers, 0, -1)]
        raw = self.redis.mget([self.keys.worker(n) for n in names]) if names else []
        return [json.loads(r) for r in raw if r]

    def stats(self) -> dict[str, int]:
        """Service-wide counters (all API and worker processes): submitted, finished:{status},
        frames (published frames)."""
        return {_s(k): int(v) for k, v in self.redis.hgetall(self.keys.stats).items()}

    def ping(self) -> bool:
        try:
            return bool(self.redis.ping())
        except redis.RedisError:
            return False

    # ------------------------------------------------------------- worker side

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
        claimed = (self._admit(_s(eid), _s(f.get(b"id")), n) for eid, f, n in entries)
        return [c for c in claimed if c is not None]

    def _read_new(self, consumer: str, count: int, block_ms: int) -> list[tuple[bytes, dict]]:
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

    def _xreadgroup(self, consumer: str, count: int, block: int | None) -> list[tuple[bytes, dict]]:
        try:
            reply = self.redis.xreadgroup(GROUP, consumer, {self.keys.jobs: ">"}, count=count,
                                          block=block)
        except redis.ResponseError as e:
            self._recreate_group(e)
            return []
        return list(reply[0][1]) if reply else []

    def _recreate_group(self, error: redis.ResponseError) -> None:
        """After NOGROUP (the stream vanished: FLUSHALL, Redis restarted without AOF), recreate
        the group so workers recover by themselves; re-raise any other error."""
        if "NOGROUP" not in str(error):
            raise error
        log.warning("job stream or consumer group missing: recreating it")
        self._ensure_group()

    def _reclaim(self, consumer: str, count: int) -> list[tuple[bytes, dict, int]]:
        """XAUTOCLAIM entries idle > lease_ms, with their delivery counts (from XPENDING)."""
        out: list[tuple[bytes, dict, int]] = []
        cursor: bytes | str = "0-0"
        for _ in range(100):  # bounded walk over the pending entries list
            reply = self.redis.xautoclaim(self.keys.jobs, GROUP, consumer, self.lease_ms,
                                          cursor, count=count - len(out))
            cursor, got = reply[0], reply[1]
            for eid, f in got:
                info = self.redis.xpending_range(self.keys.jobs, GROUP, eid, eid, 1)
                out.append((eid, f, int(info[0]["times_delivered"]) if info else 1))
            if len(out) >= count or _s(cursor) == "0-0":
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
            if not h or JobStatus(_s(h[b"status"])).terminal:
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
                          id="0-1")
            else:  # a re-run after a crash, lease loss or release
                fields["notes"] = _add_note(h, f"run {job.deliveries} on {worker}")
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

    def publish_frame(self, job_id: str, index: int, png: bytes) -> bool:
        """Append frame `index` (0 <= index < frames_total); False if it was already published
        (a re-run) or the job is over. Atomic by the event-id scheme (see module doc)."""
        if index < 0:
            raise ValueError(f"frame index must be >= 0, got {index}")
        try:
            self.redis.xadd(self.keys.events(job_id), {"type": "frame", "index": index,
                                                       "png": png}, id=f"{index + 1}-0")
        except redis.ResponseError as e:
            if "equal or smaller" not in str(e):
                raise
            return False
        # Not atomic with the XADD; only two workers racing on one job (a stale lease) could
        # write it out of order, and the next frame corrects it. The stream is the truth.
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.keys.job(job_id), "frames_done", index + 1)
        pipe.hincrby(self.keys.stats, "frames", 1)
        pipe.execute()
        return True

    def is_cancelled(self, job_id: str) -> bool:
        return bool(self.redis.exists(self.keys.cancel(job_id)))

    def cancelled(self, job_ids: Iterable[str]) -> set[str]:
        """The subset of job_ids flagged for cancellation (one round trip for a whole batch)."""
        ids = list(job_ids)
        pipe = self.redis.pipeline(transaction=False)
        for i in ids:
            pipe.exists(self.keys.cancel(i))
        return {i for i, flag in zip(ids, pipe.execute(), strict=True) if flag}

    def finish(self, job: ClaimedJob, status: JobStatus, video: bytes | None = None,
               error: str | None = None) -> bool:
        """End a job: store the video, set the status, add `done`, ack, start the TTLs.
        False if it had already ended (e.g. cancelled while queued, or by a stale worker)."""
        if not JobStatus(status).terminal:
            raise ValueError(f"finish needs a terminal status, got {status!r}")
        return self._finalize(job.id, job.entry_id, JobStatus(status), error=error, video=video)

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
            if not h or JobStatus(_s(h[b"status"])).terminal:
                self._ack(pipe, job.entry_id)
                return
            pipe.hset(key, mapping={"status": JobStatus.queued.value, "worker": "",
                                    "notes": _add_note(h, f"released by {consumer}")})
            pipe.zadd(self.keys.queued, {job.id: int(h[b"seq"])})
            pipe.xclaim(self.keys.jobs, GROUP, consumer, 0, [job.entry_id], idle=self.lease_ms,
                        retrycount=max(job.deliveries - 1, 0), justid=True)

        self.redis.transaction(txn, key)
        log.info("released job %s", job.id)

    def heartbeat(self, name: str, info: dict[str, Any], ttl_s: float) -> None:
        """Record a live worker for `ttl_s` seconds (call again well before it runs out)."""
        now = time.time()
        body = json.dumps({**info, "name": name, "last_seen": now})
        pipe = self.redis.pipeline()
        pipe.set(self.keys.worker(name), body, px=max(int(ttl_s * 1000), 1))
        pipe.zadd(self.keys.workers, {name: now + ttl_s})
        pipe.execute()

    def forget_worker(self, name: str) -> None:
        """Remove a worker's heartbeat at once (graceful shutdown)."""
        self.redis.delete(self.keys.worker(name))
        self.redis.zrem(self.keys.workers, name)

    # ---------------------------------------------------------------- helpers

    def _ack(self, pipe: Any, entry_id: str) -> Any:
        # XDEL after XACK keeps the job stream as small as the backlog.
        pipe.xack(self.keys.jobs, GROUP, entry_id)
        pipe.xdel(self.keys.jobs, entry_id)
        return pipe

    def _finalize(self, job_id: str, entry_id: str | None, status: JobStatus, *,
                  error: str | None = None, video: bytes | None = None,
                  expect: JobStatus | None = None) -> bool:
        """Atomically move a live job to a terminal status (WATCH on its hash): done event,
        ack, TTLs. False (and only the ack) if it is already over, or not in `expect`."""
        k, key = self.keys, self.keys.job(job_id)

        def txn(pipe: Any) -> bool:
            h = pipe.hgetall(key)
            current = JobStatus(_s(h[b"status"])) if h else None
            pipe.multi()
            if current is None or current.terminal or (expect and current is not expect):
                if entry_id:
                    self._ack(pipe, entry_id)
                return False
            done = max(int(h[b"frames_total"]), int(h[b"frames_done"])) + 1
            data = {"error": error, "frames_done": int(h[b"frames_done"])}
            pipe.xadd(k.events(job_id), {"type": "done", "status": status.value,
                                         "data": json.dumps(data)}, id=f"{done}-1")
            pipe.hset(key, mapping={"status": status.value, "finished_at": repr(time.time()),
                                    "error": error or ""})
            if video is not None:
                pipe.set(k.video(job_id), video)
            pipe.zrem(k.queued, job_id)
            pipe.delete(k.cancel(job_id))
            for ttl_key in (key, k.events(job_id), k.video(job_id), k.actions(job_id),
                            _s(h.get(b"idem"))):
                if ttl_key:
                    pipe.expire(ttl_key, self.job_ttl_s)
            if entry_id:
                self._ack(pipe, entry_id)
            pipe.hincrby(k.stats, f"finished:{status.value}", 1)
            return True

        ok = bool(self.redis.transaction(txn, key, value_from_callable=True))
        if ok:
            log.info("job %s %s%s", job_id, status.value, f": {error}" if error else "")
        return ok


def events_cursor(after_index: int) -> str:
    """The stream id after which frame after_index + 1 (and every control event after the
    frames up to after_index) comes; after_index -1 gives 0-0, just before `started` (0-1)."""
    return f"{min(after_index, MAX_INDEX) + 1}-0"


def stream_id(entry_id: str) -> tuple[int, int]:
    """A Redis stream id ("ms-seq") as a tuple, for comparing ids."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def connect(url: str | None, fake_server: Any = None, timeout_s: float = 10.0,
            max_connections: int | None = None) -> Any:
    """A client for `url`, or, with no url, for an in-process fakeredis server (the embedded
    mode: pass the same FakeServer to every client that must share the queue).

    timeout_s bounds every command, so a Redis that hangs (stopped, swapping, a dead network
    path) turns into redis.TimeoutError (503 from the API, backoff in the worker) instead of a
    thread blocked forever; it must exceed the longest blocking read here (1 s).

    max_connections: a pool of at most that many connections, where a caller that finds them
    all in use waits for one (up to timeout_s) instead of failing with "Too many
    connections" (redis-py's default pool fails at 100, fewer than the API's threads)."""
    if url is None:
        import fakeredis

        return fakeredis.FakeRedis(server=fake_server or fakeredis.FakeServer())
    options: dict[str, Any] = {"socket_connect_timeout": min(5.0, timeout_s),
                               "socket_timeout": timeout_s, "socket_keepalive": True,
                               "health_check_interval": 30}
    if max_connections is None:
        return redis.Redis.from_url(url, **options)
    pool = redis.BlockingConnectionPool.from_url(url, max_connections=max_connections,
                                                 timeout=timeout_s, **options)
    return redis.Redis.from_pool(pool)


def _add_note(h: dict[bytes, bytes], note: str) -> str:
    return json.dumps([*json.loads(h.get(b"notes") or b"[]"), note])


def _parse_job(job_id: str, h: dict[bytes, bytes], rank: int | None) -> Job:
    status = JobStatus(_s(h[b"status"]))
    return Job(
        id=job_id, status=status, params=json.loads(h[b"params"]),
        frames_total=int(h[b"frames_total"]), frames_done=int(h[b"frames_done"]),
        owner=_s(h.get(b"owner")) or None, created_at=float(h[b"created_at"]),
        started_at=_opt_float(h.get(b"started_at")),
        finished_at=_opt_float(h.get(b"finished_at")),
        error=_s(h.get(b"error")) or None, worker=_s(h.get(b"worker")) or None,
        deliveries=int(h.get(b"deliveries") or 0),
        notes=tuple(json.loads(h.get(b"notes") or b"[]")),
        queue_position=rank if status is JobStatus.queued else None,
        seq=int(h.get(b"seq") or 0),
    )


def _parse_event(entry_id: bytes, f: dict[bytes, bytes]) -> Event:
    kind = _s(f[b"type"])
    if kind == "frame":
        return Event(_s(entry_id), kind, index=int(f[b"index"]), png=f[b"png"])
    return Event(_s(entry_id), kind, status=JobStatus(_s(f[b"status"])),
                 data=json.loads(f.get(b"data") or b"{}"))
