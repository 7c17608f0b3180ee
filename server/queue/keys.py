"""The Redis layout of the queue, in one place: every key name and every event-stream id.

Keys, under a prefix `p`:
    p:jobs              stream of job entries {id}, consumer group GROUP (at-least-once)
    p:seq               INCR counter giving each job its place in line
    p:queued            zset of queued job ids scored by seq; ZRANK = queue position
    p:job:{id}          hash: status, params (JSON), owner, timestamps, progress, notes, ...
    p:events:{id}       stream: started, frame 0..n-1, done (see "Event ids" below)
    p:video:{id}        the MP4 bytes
    p:cancel:{id}       cancel flag for a running job
    p:actions:{id}      stream of action batches of an interactive session ({"a": JSON ints})
    p:idem:{owner}:{k}  idempotency key -> job id
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

GROUP = "workers"  # the consumer group of p:jobs
MAX_INDEX = 2**62  # frame indexes beyond this cannot exist (stream ids are 64-bit)
STARTED_ID = "0-1"  # the id of a job's `started` event: before frame 0


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


def frame_id(index: int) -> str:
    """The event id of frame `index`."""
    return f"{index + 1}-0"


def done_id(frames_total: int, frames_done: int) -> str:
    """The event id of `done`: after every frame the job has or could have published."""
    return f"{max(frames_total, frames_done) + 1}-1"


def events_cursor(after_index: int) -> str:
    """The stream id after which frame after_index + 1 (and every control event after the
    frames up to after_index) comes; after_index -1 gives 0-0, just before `started` (0-1)."""
    return f"{min(after_index, MAX_INDEX) + 1}-0"


def stream_id(entry_id: str) -> tuple[int, int]:
    """A Redis stream id ("ms-seq") as a tuple, for comparing ids."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
