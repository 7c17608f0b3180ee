"""What the queue hands out (job snapshots, claims, events) and how Redis replies decode
into them. The client uses `decode_responses=False`, so every reply here is bytes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


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


def text(value: bytes | str | None) -> str:
    """A reply as str ("" for a missing one)."""
    return value.decode() if isinstance(value, bytes) else (value or "")


def status_of(h: dict[bytes, bytes]) -> JobStatus | None:
    """The status in a job hash; None when the hash is gone (expired or never written)."""
    return JobStatus(text(h[b"status"])) if h else None


def is_live(h: dict[bytes, bytes]) -> bool:
    """Whether a job hash belongs to a job that has not ended (so it may still change)."""
    status = status_of(h)
    return status is not None and not status.terminal


def add_note(h: dict[bytes, bytes], note: str) -> str:
    """The hash's notes (a JSON list) with `note` appended, ready to store."""
    return json.dumps([*json.loads(h.get(b"notes") or b"[]"), note])


def _opt_float(value: bytes | None) -> float | None:
    return float(value) if value else None


def parse_job(job_id: str, h: dict[bytes, bytes], rank: int | None) -> Job:
    """A job from its hash and its ZRANK in the queued set."""
    status = JobStatus(text(h[b"status"]))
    return Job(
        id=job_id, status=status, params=json.loads(h[b"params"]),
        frames_total=int(h[b"frames_total"]), frames_done=int(h[b"frames_done"]),
        owner=text(h.get(b"owner")) or None, created_at=float(h[b"created_at"]),
        started_at=_opt_float(h.get(b"started_at")),
        finished_at=_opt_float(h.get(b"finished_at")),
        error=text(h.get(b"error")) or None, worker=text(h.get(b"worker")) or None,
        deliveries=int(h.get(b"deliveries") or 0),
        notes=tuple(json.loads(h.get(b"notes") or b"[]")),
        queue_position=rank if status is JobStatus.queued else None,
        seq=int(h.get(b"seq") or 0),
    )


def parse_event(entry_id: bytes, f: dict[bytes, bytes]) -> Event:
    """An event from its stream entry."""
    kind = text(f[b"type"])
    if kind == "frame":
        return Event(text(entry_id), kind, index=int(f[b"index"]), png=f[b"png"])
    return Event(text(entry_id), kind, status=JobStatus(text(f[b"status"])),
                 data=json.loads(f.get(b"data") or b"{}"))
