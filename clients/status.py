"""A rollout's status document (GET or DELETE /v1/rollouts/{id}) as a frozen dataclass; the
wire format stays the API's JSON, this is only how the client hands it out."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class RolloutStatus:
    """`status` is one of queued, running, cancelling, succeeded, failed, cancelled; `params`
    are the effective parameters, defaults filled in. Times are Unix seconds."""

    id: str
    status: str
    progress: Progress
    queue_position: int | None = None
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    worker: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    links: dict[str, str] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        """Whether the rollout has ended (succeeded, failed or cancelled)."""
        return self.status in TERMINAL

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> RolloutStatus:
        """From the API's document; fields a newer server adds are left out, not refused."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in doc.items() if k in known}
        values["progress"] = Progress(**doc["progress"])
        values["notes"] = tuple(doc.get("notes", ()))
        return cls(**values)


@dataclass(frozen=True)
class Progress:
    """How many of the rollout's frames are clean (done) of how many it will make."""

    frames_done: int
    frames_total: int
