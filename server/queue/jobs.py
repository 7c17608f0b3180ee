"""Reading jobs: one job's state, an owner's jobs page by page, queue positions, videos."""

from __future__ import annotations

from typing import cast

from dfserve.server.queue.records import Job, parse_job, text
from dfserve.server.queue.store import Store


class Jobs(Store):
    """Read-only views of the job hashes, the queued set and the owners' indexes."""

    def get(self, job_id: str) -> Job | None:
        """The job's current state, or None if unknown or expired."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.keys.job(job_id))
        pipe.zrank(self.keys.queued, job_id)
        h, rank = pipe.execute()
        return parse_job(job_id, h, rank) if h else None

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
            found = [(raw_id, self.get(text(raw_id))) for raw_id, _ in rows]
            if gone := [raw_id for raw_id, job in found if job is None]:
                self.redis.zrem(key, *gone)  # expired jobs leave the index as they are met
            jobs += [job for _, job in found if job is not None]
            if len(jobs) > limit:
                return jobs[:limit], jobs[limit - 1].seq
            if len(rows) < want:
                return jobs, None
            top = f"({int(rows[-1][1])}"

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

    def queued_count(self) -> int:
        return int(self.redis.zcard(self.keys.queued))

    def video(self, job_id: str) -> bytes | None:
        """The finished MP4, if stored."""
        return cast(bytes | None, self.redis.get(self.keys.video(job_id)))  # redis is Any
