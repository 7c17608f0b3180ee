"""A handle on one queued rollout, written once for `Rollout` and `AsyncRollout`: its calls
(status, wait, video, frame, cancel) as programs, and the stream of its events."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from dfserve.clients.core import ClientCore
from dfserve.clients.errors import RolloutFailed
from dfserve.clients.images import decode_image
from dfserve.clients.operations import Program, Sleep
from dfserve.clients.status import RolloutStatus
from dfserve.clients.stream import EventStream


class RolloutCore:
    """`doc` is the rollout's document as first seen (the submit's answer, or any document
    with its `id`); `last` is the newest status fetched (None before the first)."""

    def __init__(self, client: ClientCore, doc: dict[str, Any]) -> None:
        self.client, self.doc = client, doc
        self.id: str = doc["id"]
        self.notes: list[str] = list(doc.get("notes", []))
        self.last: RolloutStatus | None = None

    def __repr__(self) -> str:
        status = self.last.status if self.last else self.doc.get("status")
        return f"{type(self).__name__}({self.id!r}, {status!r})"

    def _stream(self, format: str, after: int, as_: str, timeout: float) -> EventStream:
        return EventStream(self.client, self.id, format, after, as_, timeout)

    def _status(self) -> Program[RolloutStatus]:
        """GET /v1/rollouts/{id}: status, progress, queue_position, effective params, ..."""
        self.last = RolloutStatus.from_json((yield from self.client._fetch(self.id)))
        return self.last

    def _wait(self, timeout: float | None, poll: float) -> Program[RolloutStatus]:
        """Until the rollout ends; its final status. TimeoutError if it has not by `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not (status := (yield from self._status())).finished:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"rollout {self.id} still {status.status} after {timeout}s")
            yield Sleep(poll)
        return status

    def _video(self, timeout: float | None) -> Program[bytes]:
        """The MP4 (waits for the end first); RolloutFailed if it failed."""
        status = yield from self._wait(timeout, poll=0.2)
        if status.status == "failed":
            raise RolloutFailed(status.error or "the rollout failed", body=asdict(status))
        r = yield from self.client._request("GET", f"/v1/rollouts/{self.id}/video")
        return r.content

    def _frame(self, index: int, as_: str) -> Program[Any]:
        """One generated frame (the server's PNG, decoded as `as_`)."""
        r = yield from self.client._request("GET", f"/v1/rollouts/{self.id}/frames/{index}")
        return decode_image(r.content, as_)

    def _cancel(self) -> Program[RolloutStatus]:
        """DELETE /v1/rollouts/{id}; the status the cancel left (cancelling or ended)."""
        r = yield from self.client._request("DELETE", f"/v1/rollouts/{self.id}")
        self.last = RolloutStatus.from_json(r.json())
        return self.last
