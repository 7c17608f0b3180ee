"""The blocking client: `Client`, `Rollout`, `Session`. Each method runs the shared program
(core.py, rollouts.py, sessions.py) with httpx and websockets' sync API; see operations.py."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from typing import Any, TypeVar, Unpack

import httpx
from websockets.sync.client import connect

import dfserve.clients.operations as ops
from dfserve.clients.core import ClientCore
from dfserve.clients.params import Action, RolloutParams, SessionParams, rollout_body
from dfserve.clients.rollouts import RolloutCore
from dfserve.clients.sessions import SessionCore
from dfserve.clients.status import RolloutStatus
from dfserve.clients.stream import Event, is_frame

T = TypeVar("T")


class Client(ClientCore):
    """A synchronous client. `transport` (an httpx transport) and `sleep` (the backoff's
    wait) are for tests."""

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, *,
                 timeout: float = 60.0, retries: int = 5, backoff: float = 0.5,
                 max_backoff: float = 30.0, transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        super().__init__(url, api_key, timeout, retries, backoff, max_backoff)
        self._sleep = sleep
        self.http = httpx.Client(base_url=self.url, timeout=timeout, headers=self._headers(),
                                 transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, *, json: Any = None,
                headers: dict[str, str] | None = None) -> httpx.Response:
        """One API call; retries 429/503 (and, for safe methods or POSTs with an idempotency
        key, connection errors); raises the typed error of a 4xx/5xx answer."""
        return self._run(self._request(method, path, json, headers))

    def models(self) -> list[dict[str, Any]]:
        return self._run(self._models())

    def model(self, model_id: str) -> dict[str, Any]:
        return self._run(self._model(model_id))

    def rollout(self, *, idempotency_key: str | None = None,
                **params: Unpack[RolloutParams]) -> Rollout:
        """Queue a rollout: a context (`context`, `context_video` or `example`), then
        `actions`, `frames`, `schedule`, `sampler`, `steps`, `eta`, `guidance`, `seed`, ...
        as in POST /v1/rollouts (params.py)."""
        return Rollout(self, self._run(self._submit(params, idempotency_key)))

    def get(self, rollout_id: str) -> Rollout:
        """A handle on an existing rollout."""
        return Rollout(self, self._run(self._fetch(rollout_id)))

    def session(self, *, format: str = "png", as_: str = "numpy", timeout: float = 120.0,
                **params: Unpack[SessionParams]) -> Session:
        """Open an interactive session (WS /v1/sessions); use it as a context manager."""
        return Session(self, rollout_body(**params), format, as_, timeout)

    def _ws(self, url: str) -> Any:
        ws = connect(url, additional_headers=self._headers(), open_timeout=self.timeout,
                     max_size=None, max_queue=None)
        # websockets >= 17 warns unless connect() is a `with` block; a Session outlives one
        # call, and every connection here is closed explicitly.
        if hasattr(ws, "pending_legacy_warning"):
            ws.pending_legacy_warning = False
        return ws

    def _run(self, program: ops.Program[T]) -> T:
        """Run a shared program, performing its operations here and now."""
        step = ops.Stepper(program)
        while step.operation is not None:
            step.resume(ops.outcome(self._perform, step.operation))
        return step.result

    def _perform(self, op: ops.Operation) -> Any:
        match op:
            case ops.Call():
                return self.http.request(op.method, op.path, json=op.json, headers=op.headers)
            case ops.Sleep(seconds=seconds, backoff=True):
                return self._sleep(seconds)
            case ops.Sleep(seconds=seconds):
                return time.sleep(seconds)
            case ops.Connect(url=url):
                return self._ws(url)
            case ops.Send(ws=ws, text=text):
                return ws.send(text)
            case ops.Recv(ws=ws, timeout=timeout):
                return ws.recv(timeout=timeout)
            case ops.Close(ws=ws):
                return ws.close()
        raise TypeError(f"not an operation: {op!r}")


class Rollout(RolloutCore):
    """A queued rollout: status, wait, frames (streamed), video, cancel."""

    client: Client

    def status(self) -> RolloutStatus:
        """GET /v1/rollouts/{id}: status, progress, queue_position, effective params, ..."""
        return self.client._run(self._status())

    def wait(self, timeout: float | None = None, poll: float = 0.2) -> RolloutStatus:
        """Block until the rollout ends; its final status. TimeoutError if it does not."""
        return self.client._run(self._wait(timeout, poll))

    def video(self, timeout: float | None = None) -> bytes:
        """The MP4 (waits for the end first); RolloutFailed if it failed."""
        return self.client._run(self._video(timeout))

    def frame(self, index: int, as_: str = "numpy") -> Any:
        """One generated frame (the server's PNG, decoded as `as_`)."""
        return self.client._run(self._frame(index, as_))

    def cancel(self) -> RolloutStatus:
        return self.client._run(self._cancel())

    def events(self, format: str = "png", after: int = -1, as_: str = "bytes",
               timeout: float = 120.0) -> Generator[Event, None, None]:
        """Every stream message as a dict (queued, started, frame (with `image`), progress,
        done). A dropped connection is resumed from the last frame seen."""
        stream = self._stream(format, after, as_, timeout)
        try:
            while (event := self.client._run(stream.next_event())) is not None:
                yield event
        finally:
            self.client._run(stream.close())

    def frames(self, format: str = "png", as_: str = "numpy", after: int = -1,
               timeout: float = 120.0) -> Generator[Any, None, None]:
        """The generated frames in order (after `after`), each as soon as it is clean.
        Ends when the rollout ends; RolloutFailed if it failed."""
        return (ev["image"] for ev in self.events(format, after, as_, timeout) if is_frame(ev))


class Session(SessionCore):
    """Interactive play: `step(action)` sends one action and returns the frame it makes."""

    client: Client

    def __init__(self, client: Client, start: dict[str, Any], format: str, as_: str,
                 timeout: float) -> None:
        super().__init__(client, as_, timeout)
        client._run(self._open(start, format))

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def step(self, action: Action | Sequence[Action]) -> Any:
        """Send one action (or a list: one frame each); the frame (or list of frames)."""
        return self.client._run(self._step(action))

    def close(self) -> dict[str, Any] | None:
        """Stop the session (frees the worker's slot); the final `done` message."""
        return self.client._run(self._close())
