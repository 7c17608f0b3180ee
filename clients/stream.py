"""A rollout's frame stream (WS /v1/rollouts/{id}/stream), read one event at a time.

Each event is a dict: queued, started, frame (with the decoded `image`), progress, done. A
dropped connection is reopened with `after=` the last frame seen, so the reader goes on
seamlessly; a refused handshake (401, 404, ...) raises the API's typed error instead.
"""

from __future__ import annotations

import json
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidStatus

from dfserve.clients.core import ClientCore
from dfserve.clients.errors import RolloutFailed, ServerError, api_error, stream_error
from dfserve.clients.images import decode_image
from dfserve.clients.operations import Close, Connect, Program, Recv, Sleep

Event = dict[str, Any]
DROPPED = (ConnectionClosed, OSError, TimeoutError, InvalidStatus)  # what a reconnect may fix


class StreamParser:
    """Turns the stream's messages into events: a frame's JSON header and the binary image
    after it become one `frame` event with `image`; an `error` message raises."""

    def __init__(self, as_: str) -> None:
        self.as_ = as_
        self.header: Event | None = None

    def feed(self, msg: str | bytes) -> Event | None:
        if isinstance(msg, bytes):
            header, self.header = self.header, None
            return None if header is None else {**header, "image": decode_image(msg, self.as_)}
        doc = json.loads(msg)
        if doc["type"] == "error":
            raise stream_error(doc)
        if doc["type"] == "frame":
            self.header = doc
            return None
        return dict(doc)


def is_frame(event: Event) -> bool:
    """Whether a stream event carries a frame; RolloutFailed when it says the rollout failed."""
    if event["type"] == "done" and event.get("status") == "failed":
        raise RolloutFailed(event.get("error") or "the rollout failed", body=event)
    return bool(event["type"] == "frame")


class EventStream:
    """`next_event()` until it gives None (after `done`); `close()` if the reader stops early."""

    def __init__(self, client: ClientCore, rollout_id: str, format: str, after: int, as_: str,
                 timeout: float) -> None:
        self.client, self.rollout_id, self.format = client, rollout_id, format
        self.after, self.as_, self.timeout = after, as_, timeout
        self.ws: Any = None
        self.parser = StreamParser(as_)
        self.attempt = 0  # reconnects since the last message
        self.ended = False

    def next_event(self) -> Program[Event | None]:
        while not self.ended:
            try:
                message = yield from self._receive()  # first: it may start a new parser
                event = self.parser.feed(message)
            except DROPPED as e:
                yield from self._reconnect_later(e)
                continue
            self.attempt = 0
            if event is None:
                continue
            if "image" in event:
                self.after = event["index"]
            if event["type"] == "done":
                self.ended = True
                yield from self.close()
            return event
        return None

    def close(self) -> Program[None]:
        ws, self.ws = self.ws, None
        if ws is not None:
            yield Close(ws)

    def _receive(self) -> Program[str | bytes]:
        if self.ws is None:
            url = self.client._ws_url(f"/v1/rollouts/{self.rollout_id}/stream",
                                      after=self.after, format=self.format)  # fmt: skip
            self.ws = yield Connect(url)
            self.parser = StreamParser(self.as_)
        message: str | bytes = yield Recv(self.ws, self.timeout)
        return message

    def _reconnect_later(self, e: Exception) -> Program[None]:
        """After a backoff; or the handshake's typed error, or ServerError once the retries
        are spent."""
        yield from self.close()
        if isinstance(e, InvalidStatus):
            body = e.response.body.decode(errors="replace")
            raise api_error(e.response.status_code, body) from e
        if self.attempt >= self.client.retries:
            raise ServerError(f"stream of {self.rollout_id} lost: {e!r}") from e
        yield Sleep(self.client._delay(self.attempt, None), backoff=True)
        self.attempt += 1
