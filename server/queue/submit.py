"""Submitting a job, atomically: one MULTI/EXEC writes everything a new job is (its hash, its
place in line, its stream entry, its idempotency key, the owner's index, the counter), so a
job is accepted whole or not at all, whatever crashes or disconnects meanwhile."""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

import redis

from dfserve.server.queue.jobs import Jobs
from dfserve.server.queue.records import Job, JobStatus, parse_job, text

log = logging.getLogger(__name__)

MAX_OWNED = 10_000  # GET /v1/rollouts lists at most this many of an owner's newest jobs


class QueueFull(Exception):
    """Raised by `submit` when `max_queued` jobs are already waiting (the API answers 429)."""

    def __init__(self, queued: int, limit: int) -> None:
        super().__init__(f"queue is full: {queued} jobs queued (limit {limit})")
        self.queued, self.limit = queued, limit


class Submission(Jobs):
    """Puts new jobs in line."""

    def submit(self, params: dict[str, Any], frames_total: int, owner: str | None = None,
               idempotency_key: str | None = None) -> Job:
        """Enqueue a rollout; a repeated (owner, idempotency_key) returns that job instead."""
        if frames_total < 1:
            raise ValueError(f"frames_total must be >= 1, got {frames_total}")
        return self._enqueue(params, frames_total, owner, idempotency_key, listed=True)

    def _enqueue(self, params: dict[str, Any], frames_total: int, owner: str | None,
                 idempotency_key: str | None, *, listed: bool) -> Job:
        """Enqueue a job with `frames_total` frames to make; `listed`: whether the owner's
        index (GET /v1/rollouts) shows it."""
        idem = self.keys.idem(owner, idempotency_key) if idempotency_key else ""
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    return self._enqueue_once(pipe, params, frames_total, owner, idem, listed)
                except redis.WatchError:  # a racing submit took the key: the retry finds its job
                    continue

    def _enqueue_once(self, pipe: Any, params: dict[str, Any], frames_total: int,
                      owner: str | None, idem: str, listed: bool) -> Job:
        reader = self.redis  # no key to watch: the pipeline holds no connection until EXEC
        if idem:
            # WATCH first: if a racing submit sets the key after we read it, our EXEC fails
            # (WatchError) and the retry returns that submit's job. So two submits with one key
            # never make two jobs, and a key left pointing at an expired job is taken over.
            pipe.watch(idem)
            reader = pipe  # watching: reads run at once on its connection (one per submit)
            if existing := self._idem_job(reader, idem):
                return existing
        queued = int(reader.zcard(self.keys.queued))
        if queued >= self.max_queued:  # a soft limit: racing submits may overshoot it slightly
            raise QueueFull(queued, self.max_queued)
        seq = int(reader.incr(self.keys.seq))  # only orders jobs: a retry's number is a gap
        fields = {"status": JobStatus.queued.value, "params": json.dumps(params),
                  "owner": owner or "", "created_at": repr(time.time()), "started_at": "",
                  "finished_at": "", "frames_done": 0, "frames_total": frames_total,
                  "error": "", "worker": "", "deliveries": 0, "notes": "[]", "seq": seq,
                  "idem": idem}
        job = self._commit(pipe, uuid.uuid4().hex, fields, owner, listed)
        log.info("queued job %s (%d frames, owner %s)", job.id, frames_total, owner or "-")
        return job

    def _commit(self, pipe: Any, job_id: str, fields: dict[str, Any], owner: str | None,
                listed: bool) -> Job:
        """The one MULTI/EXEC that makes a job: everything it is, and its state as written."""
        key, seq, idem = self.keys.job(job_id), fields["seq"], fields["idem"]
        pipe.multi()
        pipe.hset(key, mapping=fields)
        pipe.expire(key, self._pending_ttl_s)
        if idem:
            pipe.set(idem, job_id, ex=self._pending_ttl_s)
        pipe.zadd(self.keys.queued, {job_id: seq})
        pipe.xadd(self.keys.jobs, {"id": job_id})
        pipe.hincrby(self.keys.stats, "submitted", 1)
        if listed:
            self._index_owned(pipe, owner, job_id, seq)
        pipe.hgetall(key)
        pipe.zrank(self.keys.queued, job_id)
        *_, h, rank = pipe.execute()
        return parse_job(job_id, h, rank)

    def _idem_job(self, reader: Any, idem: str) -> Job | None:
        """The live or finished job an idempotency key points at; None when there is no key
        or its job has expired."""
        job_id = text(reader.get(idem))
        h = reader.hgetall(self.keys.job(job_id)) if job_id else {}
        return parse_job(job_id, h, reader.zrank(self.keys.queued, job_id)) if h else None

    def _index_owned(self, pipe: Any, owner: str | None, job_id: str, seq: int) -> None:
        # The index outlives no job by much: it expires with the newest job's pending TTL,
        # and `list_jobs` drops ids whose hash has expired.
        key = self.keys.owned(owner)
        pipe.zadd(key, {job_id: seq})
        pipe.zremrangebyrank(key, 0, -MAX_OWNED - 1)
        pipe.expire(key, self._pending_ttl_s)
