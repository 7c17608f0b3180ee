"""How a job ends: finished by its worker, or cancelled (at once while queued; by a flag the
worker checks between rows while running). Every ending goes through `_finalize`, one WATCH
transaction, so a job ends exactly once however many parties race to end it."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from typing import Any

from dfserve.server.queue.jobs import Jobs
from dfserve.server.queue.keys import done_id
from dfserve.server.queue.records import ClaimedJob, Job, JobStatus, status_of, text

log = logging.getLogger(__name__)


class Lifecycle(Jobs):
    """Cancel flags and terminal transitions."""

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

    def _finalize(self, job_id: str, entry_id: str | None, status: JobStatus, *,
                  error: str | None = None, video: bytes | None = None,
                  expect: JobStatus | None = None) -> bool:
        """Atomically move a live job to a terminal status (WATCH on its hash): done event,
        ack, TTLs. False (and only the ack) if it is already over, or not in `expect`."""
        k, key = self.keys, self.keys.job(job_id)

        def txn(pipe: Any) -> bool:
            h = pipe.hgetall(key)
            current = status_of(h)
            pipe.multi()
            if current is None or current.terminal or (expect and current is not expect):
                if entry_id:
                    self._ack(pipe, entry_id)
                return False
            frames_done = int(h[b"frames_done"])
            data = {"error": error, "frames_done": frames_done}
            pipe.xadd(k.events(job_id), {"type": "done", "status": status.value,
                                         "data": json.dumps(data)},
                      id=done_id(int(h[b"frames_total"]), frames_done))
            pipe.hset(key, mapping={"status": status.value, "finished_at": repr(time.time()),
                                    "error": error or ""})
            if video is not None:
                pipe.set(k.video(job_id), video)
            pipe.zrem(k.queued, job_id)
            pipe.delete(k.cancel(job_id))
            for ttl_key in (key, k.events(job_id), k.video(job_id), k.actions(job_id),
                            text(h.get(b"idem"))):
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
