"""What the service knows of itself: live workers (heartbeats), when a slot is likely to
free up (a 429's Retry-After), and the service-wide counters /metrics exports."""

from __future__ import annotations

import json
import time
from typing import Any

from dfserve.server.queue.records import JobStatus, text
from dfserve.server.queue.store import Store


class Health(Store):
    """Worker heartbeats, the next free slot, counters."""

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

    def workers(self) -> list[dict[str, Any]]:
        """Live workers: their last heartbeat info plus `name` and `last_seen` (epoch s)."""
        self.redis.zremrangebyscore(self.keys.workers, "-inf", time.time())
        names = [text(n) for n in self.redis.zrange(self.keys.workers, 0, -1)]
        raw = self.redis.mget([self.keys.worker(n) for n in names]) if names else []
        return [json.loads(r) for r in raw if r]

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
            if text(status) != JobStatus.running.value or not started or not done:
                continue
            done_n, total_n = int(done), int(total)
            if done_n > 0:
                guesses.append((now - float(started)) / done_n * max(total_n - done_n, 0))
        return min(guesses) if guesses else None

    def stats(self) -> dict[str, int]:
        """Service-wide counters (all API and worker processes): submitted, finished:{status},
        frames (published frames)."""
        return {text(k): int(v) for k, v in self.redis.hgetall(self.keys.stats).items()}
