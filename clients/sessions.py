"""Interactive play over WS /v1/sessions, written once for `Session` and `AsyncSession`.

The client sends `start` and then one `action` message per step; the server answers with
queued, ready, the context frame, one frame per action and, at the end, `done`. Images come
as a JSON header followed by the binary image.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from websockets.exceptions import ConnectionClosed

from dfserve.clients.core import ClientCore
from dfserve.clients.errors import SessionEnded, stream_error
from dfserve.clients.images import decode_image
from dfserve.clients.operations import Close, Connect, Program, Recv, Send
from dfserve.clients.params import Action


class SessionCore:
    """A session's state (`ready` is the server's `ready` message) and its steps as programs."""

    def __init__(self, client: ClientCore, as_: str, timeout: float) -> None:
        self.client, self.as_, self.timeout = client, as_, timeout
        self.ws: Any = None
        self.ready: dict[str, Any] = {}
        self.context: Any = None  # the last context frame
        self.frames_received = 0
        self.queue_position: int | None = None

    id = property(lambda self: self.ready.get("session"))
    fps = property(lambda self: self.ready.get("fps"))
    actions = property(lambda self: self.ready.get("actions"))

    def _open(self, start: dict[str, Any], format: str) -> Program[None]:
        """Connect and start; returns once the context frame has come (the session is ready)."""
        self.ws = yield Connect(self.client._ws_url("/v1/sessions"))
        yield Send(self.ws, json.dumps({"type": "start", **start, "format": format}))
        try:
            yield from self._until("context")
        except BaseException:
            yield Close(self.ws)
            raise

    def _step(self, action: Action | Sequence[Action]) -> Program[Any]:
        """Send one action (or a list: one frame each); the frame (or list of frames)."""
        many = isinstance(action, (list, tuple))
        actions = list(action) if isinstance(action, (list, tuple)) else [action]
        try:
            yield Send(self.ws, json.dumps({"type": "action", "actions": actions}))
        except ConnectionClosed:
            pass  # ended: its `done` is still to be read, and says why
        out = []
        for _ in actions:
            out.append((yield from self._until("frame"))["image"])
        return out if many else out[0]

    def _close(self) -> Program[dict[str, Any] | None]:
        """Stop the session (frees the worker's slot); the final `done` message."""
        done = None
        try:
            yield Send(self.ws, json.dumps({"type": "stop"}))
            done = yield from self._until("done")
        except SessionEnded as e:
            done = e.body
        except (ConnectionClosed, OSError, TimeoutError):
            pass
        finally:
            yield Close(self.ws)
        return done

    def _until(self, kind: str) -> Program[dict[str, Any]]:
        """Read messages until one of type `kind` (with its image, if any)."""
        while True:
            try:
                msg = yield Recv(self.ws, self.timeout)
            except ConnectionClosed as e:
                raise SessionEnded(f"the connection closed ({e})") from e
            if isinstance(msg, bytes):
                continue
            doc = self._note(json.loads(msg))
            if doc["type"] in ("frame", "context"):
                yield from self._attach_image(doc)
            if doc["type"] == kind:
                return doc

    def _attach_image(self, doc: dict[str, Any]) -> Program[None]:
        """Read the image that follows a frame or context header into `doc["image"]`."""
        image = decode_image((yield Recv(self.ws, self.timeout)), self.as_)
        if doc["type"] == "context":
            self.context = image
        else:
            self.frames_received += 1
        doc["image"] = image

    def _note(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Keep what a message tells about the session; raise what it says went wrong."""
        kind = doc.get("type")
        if kind == "error":
            raise stream_error(doc)
        if kind == "queued":
            self.queue_position = doc.get("position")
        elif kind == "ready":
            self.ready = doc
        elif kind == "done":  # close() expects it; anywhere else the session ended under us
            raise SessionEnded(doc.get("error") or doc.get("reason") or
                               f"the session ended ({doc.get('status')})", body=doc)
        return doc
