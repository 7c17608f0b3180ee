"""Python client of the dfserve API (DESIGN §3): `Client` (sync) and `AsyncClient` (asyncio).

    from clients import Client

    with Client("http://127.0.0.1:8000", api_key=None) as c:
        r = c.rollout(example="walk", frames=32, seed=1)
        for frame in r.frames(format="png"):  # numpy uint8 (R, R, 3), as they are generated
            ...
        open("out.mp4", "wb").write(r.video())
        with c.session(example="walk", seed=1) as s:  # interactive play (WS /v1/sessions)
            frame = s.step("move_left")

HTTP errors become typed exceptions (DfserveError and its subclasses, with the API's `field`
and `accepted` values). 429 and 503 are retried with exponential backoff that honours
Retry-After; every POST carries an Idempotency-Key, so a retried submit never runs twice. A
dropped frame stream reconnects with `after=` the last frame seen and goes on seamlessly.
The client depends on httpx, websockets, numpy and Pillow only (not on the server's code).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import numpy as np
from PIL import Image
from websockets.asyncio.client import connect as aconnect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

TERMINAL = ("succeeded", "failed", "cancelled")
RETRY_STATUSES = (429, 503)
ImageLike = Any  # PIL.Image.Image | numpy uint8 (H, W, 3) | str | Path | bytes (PNG/JPEG)


# ------------------------------------------------------------------------------- errors


class DfserveError(Exception):
    """An error answered by the API (or the stream); `status` is the HTTP status (0: none)."""

    def __init__(self, message: str, status: int = 0, field: str | None = None,
                 accepted: Any = None, body: Any = None) -> None:
        super().__init__(message)
        self.status, self.field, self.message = status, field, message
        self.accepted, self.body = accepted, body

    def __str__(self) -> str:
        where = f"{self.field}: " if self.field else ""
        ok = f" (accepted: {self.accepted})" if self.accepted is not None else ""
        code = f"{self.status} " if self.status else ""
        return f"{code}{where}{self.message}{ok}"


class BadRequest(DfserveError):
    """400/413/415/422: the request names a bad `field`; `accepted` lists the good values."""


class Unauthorized(DfserveError):
    """401: no or an unknown API key."""


class Forbidden(DfserveError):
    """403: the key may not see this resource."""


class NotFound(DfserveError):
    """404: unknown (or expired) rollout, model or session."""


class Conflict(DfserveError):
    """409: e.g. the video of a rollout that has not succeeded."""


class QueueFull(DfserveError):
    """429 after the retries: the queue is full; `retry_after` seconds is the server's hint."""

    def __init__(self, *args: Any, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.retry_after = retry_after


class ServerError(DfserveError):
    """5xx, or the server could not be reached after the retries."""


class RolloutFailed(DfserveError):
    """The rollout ended `failed` (its `message` is the server's error)."""


class SessionEnded(DfserveError):
    """The interactive session is over (stopped, idle, cancelled or failed)."""


def _error(status: int, body: Any, headers: Any = None) -> DfserveError:
    """The exception for an API error answer {detail: {field, message, accepted?}}."""
    detail = body.get("detail") if isinstance(body, dict) else body
    if isinstance(detail, dict):
        message, field, accepted = (str(detail.get("message", "")), detail.get("field"),
                                    detail.get("accepted"))  # fmt: skip
    else:
        message, field, accepted = str(detail or body or "error"), None, None
    kw = {"status": status, "field": field, "accepted": accepted, "body": body}
    if status == 429:
        return QueueFull(message, retry_after=_retry_after(headers), **kw)
    cls: type[DfserveError] = {401: Unauthorized, 403: Forbidden, 404: NotFound,
                               409: Conflict}.get(status, DfserveError)  # fmt: skip
    if status in (400, 413, 415, 422):
        cls = BadRequest
    elif status >= 500:
        cls = ServerError
    return cls(message, **kw)


def _response_error(r: httpx.Response) -> DfserveError:
    try:
        body: Any = r.json()
    except ValueError:
        body = r.text
    return _error(r.status_code, body, r.headers)


def _retry_after(headers: Any) -> float | None:
    value = headers.get("retry-after") if headers is not None else None
    try:
        return max(float(value), 0.0) if value is not None else None
    except ValueError:
        return None


class _StreamParser:
    """Turns the rollout stream's messages into events: a frame's JSON header and the binary
    image after it become one `frame` event with `image`; an `error` message raises."""

    def __init__(self, as_: str) -> None:
        self.as_ = as_
        self.header: dict[str, Any] | None = None

    def feed(self, msg: str | bytes) -> dict[str, Any] | None:
        if isinstance(msg, bytes):
            header, self.header = self.header, None
            return None if header is None else {**header, "image": decode_image(msg, self.as_)}
        doc = json.loads(msg)
        if doc["type"] == "error":
            raise _stream_error(doc)
        if doc["type"] == "frame":
            self.header = doc
            return None
        return dict(doc)


def _raise_unless_retryable(rollout_id: str, e: Exception, attempt: int, retries: int) -> None:
    """A broken rollout stream: a refused handshake (401, 404, ...) is the API's typed error;
    a dropped connection is retried (resuming after the last frame) until retries run out."""
    if isinstance(e, InvalidStatus):
        body = e.response.body.decode(errors="replace")
        raise _error(e.response.status_code, body) from e
    if attempt >= retries:
        raise ServerError(f"stream of {rollout_id} lost: {e!r}") from e


def _is_frame(event: dict[str, Any]) -> bool:
    """Whether a stream event carries a frame; RolloutFailed when it says the rollout failed."""
    if event["type"] == "done" and event.get("status") == "failed":
        raise RolloutFailed(event.get("error") or "the rollout failed", body=event)
    return bool(event["type"] == "frame")


def _stream_error(doc: dict[str, Any]) -> DfserveError:
    """An {"type": "error"} message of a WebSocket as the matching exception."""
    detail = doc.get("detail") or {}
    status = doc.get("status") or (404 if detail.get("field") in ("id", "session") else 422)
    return _error(int(status), {"detail": detail})


# ------------------------------------------------------------------------------- images


def encode_image(image: ImageLike) -> str:
    """Base64 PNG/JPEG of a PIL image, a uint8 (H, W, 3) array, a file path or image bytes."""
    if isinstance(image, (str, Path)):
        data = Path(image).read_bytes()
    elif isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    else:
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3:
                raise ValueError(f"context: arrays must be uint8 (H, W, 3), got {image.dtype} "
                                 f"{image.shape}")  # fmt: skip
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise ValueError(f"context: {type(image).__name__} is not an image")
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG")
        data = buf.getvalue()
    return base64.b64encode(data).decode()


def _context_list(context: Any) -> list[str]:
    if isinstance(context, np.ndarray) and context.ndim == 4:  # (K, H, W, 3)
        context = list(context)
    elif not isinstance(context, (list, tuple)):
        context = [context]
    return [encode_image(c) for c in context]


def decode_image(data: bytes, as_: str = "numpy") -> Any:
    """Frame bytes as a uint8 (R, R, 3) array ("numpy"), a PIL image ("pil") or as is."""
    if as_ == "bytes":
        return data
    image = Image.open(io.BytesIO(data))
    image.load()
    if as_ == "pil":
        return image
    if as_ == "numpy":
        return np.asarray(image.convert("RGB"))
    raise ValueError(f"as_: {as_!r} is not one of ['numpy', 'pil', 'bytes']")


def rollout_body(*, model: str | None = None, context: Any = None,
                 context_video: str | Path | bytes | None = None, example: str | None = None,
                 **params: Any) -> dict[str, Any]:
    """The JSON body of POST /v1/rollouts (and of a session's start message)."""
    body: dict[str, Any] = {"model": model, "example": example, **params}
    if context is not None:
        body["context"] = _context_list(context)
    if context_video is not None:
        data = (context_video if isinstance(context_video, bytes)
                else Path(context_video).read_bytes())
        body["context_video"] = base64.b64encode(data).decode()
    return {k: v for k, v in body.items() if v is not None}


# ------------------------------------------------------------------------------- shared


class _Base:
    def __init__(self, url: str, api_key: str | None, timeout: float, retries: int,
                 backoff: float, max_backoff: float) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("DFSERVE_API_KEY")
        self.timeout, self.retries = timeout, retries
        self.backoff, self.max_backoff = backoff, max_backoff

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _ws_url(self, path: str, **query: Any) -> str:
        base = "ws" + self.url[4:] if self.url.startswith("http") else self.url
        query = {k: v for k, v in query.items() if v is not None}
        return base + path + (f"?{urlencode(query)}" if query else "")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff, never shorter than the server's Retry-After."""
        delay = min(self.backoff * 2**attempt, self.max_backoff)
        return max(delay, retry_after) if retry_after is not None else delay

    @staticmethod
    def _post_headers(idempotency_key: str | None) -> dict[str, str]:
        return {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}


def _rollout_params(kw: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    key = kw.pop("idempotency_key", None)
    return rollout_body(**kw), key


# ------------------------------------------------------------------------------- sync


class Client(_Base):
    """A synchronous client. `transport` (an httpx transport) is for tests."""

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

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """One API call; retries 429/503 (and, for safe methods or POSTs with an idempotency
        key, connection errors); raises the typed error of a 4xx/5xx answer."""
        retry_transport = method in ("GET", "DELETE") or "Idempotency-Key" in kw.get(
            "headers", {})
        for attempt in range(self.retries + 1):
            try:
                r = self.http.request(method, path, **kw)
            except httpx.TransportError as e:
                if not retry_transport or attempt >= self.retries:
                    raise ServerError(f"{method} {path}: {e!r}") from e
                self._sleep(self._delay(attempt, None))
                continue
            if r.status_code in RETRY_STATUSES and attempt < self.retries:
                self._sleep(self._delay(attempt, _retry_after(r.headers)))
                continue
            if r.status_code >= 400:
                raise _response_error(r)
            return r
        raise AssertionError("unreachable")

    def models(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/v1/models").json()["models"])

    def model(self, model_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/v1/models/{model_id}").json())

    def rollout(self, **kw: Any) -> Rollout:
        """Queue a rollout. Context: `context` (images: PIL, uint8 arrays, paths or bytes),
        `context_video` (a path or bytes) or `example`; then `actions`, `frames`, `schedule`,
        `sampler`, `steps`, `eta`, `guidance`, `seed`, ... as in POST /v1/rollouts."""
        body, key = _rollout_params(kw)
        r = self.request("POST", "/v1/rollouts", json=body, headers=self._post_headers(key))
        return Rollout(self, r.json())

    def get(self, rollout_id: str) -> Rollout:
        """A handle on an existing rollout."""
        return Rollout(self, self.request("GET", f"/v1/rollouts/{rollout_id}").json())

    def session(self, *, format: str = "png", as_: str = "numpy", timeout: float = 120.0,
                **kw: Any) -> Session:
        """Open an interactive session (WS /v1/sessions); use it as a context manager."""
        return Session(self, rollout_body(**kw), format, as_, timeout)

    def _ws(self, url: str) -> Any:
        ws = connect(url, additional_headers=self._headers(), open_timeout=self.timeout,
                     max_size=None, max_queue=None)
        # websockets >= 17 warns unless connect() is a `with` block; a Session outlives one
        # call, and every connection here is closed explicitly.
        if hasattr(ws, "pending_legacy_warning"):
            ws.pending_legacy_warning = False
        return ws


class Rollout:
    """A queued rollout: status, wait, frames (streamed), video, cancel."""

    def __init__(self, client: Client, doc: dict[str, Any]) -> None:
        self.client, self.doc = client, doc
        self.id: str = doc["id"]
        self.notes: list[str] = list(doc.get("notes", []))

    def __repr__(self) -> str:
        return f"Rollout({self.id!r}, {self.doc.get('status')!r})"

    def status(self) -> dict[str, Any]:
        """GET /v1/rollouts/{id}: status, progress, queue_position, effective params, ..."""
        self.doc = self.client.request("GET", f"/v1/rollouts/{self.id}").json()
        return self.doc

    def wait(self, timeout: float | None = None, poll: float = 0.2) -> dict[str, Any]:
        """Block until the rollout ends; its final status document. TimeoutError if not."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (doc := self.status())["status"] not in TERMINAL:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"rollout {self.id} still {doc['status']} after {timeout}s")
            time.sleep(poll)
        return doc

    def video(self, timeout: float | None = None) -> bytes:
        """The MP4 (waits for the end first); RolloutFailed if it failed."""
        doc = self.wait(timeout)
        if doc["status"] == "failed":
            raise RolloutFailed(doc.get("error") or "the rollout failed", body=doc)
        return self.client.request("GET", f"/v1/rollouts/{self.id}/video").content

    def frame(self, index: int, as_: str = "numpy") -> Any:
        """One generated frame (the server's PNG, decoded as `as_`)."""
        png = self.client.request("GET", f"/v1/rollouts/{self.id}/frames/{index}").content
        return decode_image(png, as_)

    def cancel(self) -> dict[str, Any]:
        self.doc = self.client.request("DELETE", f"/v1/rollouts/{self.id}").json()
        return self.doc

    def events(self, format: str = "png", after: int = -1, as_: str = "bytes",
               timeout: float = 120.0) -> Iterator[dict[str, Any]]:
        """Every stream message as a dict (queued, started, frame (with `image`), progress,
        done). A dropped connection is resumed from the last frame seen."""
        attempt = 0
        while True:
            url = self.client._ws_url(f"/v1/rollouts/{self.id}/stream", after=after,
                                      format=format)  # fmt: skip
            try:
                with self.client._ws(url) as ws:
                    parser = _StreamParser(as_)
                    while True:
                        event = parser.feed(ws.recv(timeout=timeout))
                        attempt = 0
                        if event is None:
                            continue
                        if "image" in event:
                            after = event["index"]
                        yield event
                        if event["type"] == "done":
                            return
            except (ConnectionClosed, OSError, TimeoutError, InvalidStatus) as e:
                _raise_unless_retryable(self.id, e, attempt, self.client.retries)
                self.client._sleep(self.client._delay(attempt, None))
                attempt += 1

    def frames(self, format: str = "png", as_: str = "numpy", after: int = -1,
               timeout: float = 120.0) -> Iterator[Any]:
        """The generated frames in order (after `after`), each as soon as it is clean.
        Ends when the rollout ends; RolloutFailed if it failed."""
        for ev in self.events(format, after, as_, timeout):
            if _is_frame(ev):
                yield ev["image"]


class Session:
    """Interactive play: `step(action)` sends one action and returns the frame it makes."""

    def __init__(self, client: Client, start: dict[str, Any], format: str, as_: str,
                 timeout: float) -> None:
        self.client, self.as_, self.timeout = client, as_, timeout
        self.ws = client._ws(client._ws_url("/v1/sessions"))
        self.ready: dict[str, Any] = {}
        self.context: Any = None  # the last context frame
        self.frames_received = 0
        self.queue_position: int | None = None
        self.ws.send(json.dumps({"type": "start", **start, "format": format}))
        try:
            self._until("context")
        except BaseException:
            self.ws.close()
            raise

    id = property(lambda self: self.ready.get("session"))
    fps = property(lambda self: self.ready.get("fps"))
    actions = property(lambda self: self.ready.get("actions"))

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _until(self, kind: str) -> dict[str, Any]:
        """Read messages until one of type `kind` (with its image, if any)."""
        while True:
            try:
                msg = self.ws.recv(timeout=self.timeout)
            except ConnectionClosed as e:
                raise SessionEnded(f"the connection closed ({e})") from e
            if isinstance(msg, bytes):
                continue
            doc = _session_message(self, json.loads(msg))
            if doc["type"] in ("frame", "context"):
                image = decode_image(self.ws.recv(timeout=self.timeout), self.as_)
                if doc["type"] == "context":
                    self.context = image
                else:
                    self.frames_received += 1
                doc["image"] = image
            if doc["type"] == kind:
                return doc

    def step(self, action: str | int | Sequence[str | int]) -> Any:
        """Send one action (or a list: one frame each); the frame (or list of frames)."""
        many = isinstance(action, (list, tuple))
        actions = list(action) if isinstance(action, (list, tuple)) else [action]
        with contextlib.suppress(ConnectionClosed):  # ended: its `done` is still to be read
            self.ws.send(json.dumps({"type": "action", "actions": actions}))
        out = [self._until("frame")["image"] for _ in actions]
        return out if many else out[0]

    def close(self) -> dict[str, Any] | None:
        """Stop the session (frees the worker's slot); the final `done` message."""
        done = None
        try:
            self.ws.send(json.dumps({"type": "stop"}))
            done = self._until("done")
        except SessionEnded as e:
            done = e.body
        except (ConnectionClosed, OSError, TimeoutError):
            pass
        finally:
            self.ws.close()
        return done


def _session_message(session: Any, doc: dict[str, Any]) -> dict[str, Any]:
    kind = doc.get("type")
    if kind == "error":
        raise _stream_error(doc)
    if kind == "queued":
        session.queue_position = doc.get("position")
    elif kind == "ready":
        session.ready = doc
    elif kind == "done":  # close() expects it; anywhere else the session ended under us
        raise SessionEnded(doc.get("error") or doc.get("reason") or
                           f"the session ended ({doc.get('status')})", body=doc)
    return doc


# ------------------------------------------------------------------------------- async


class AsyncClient(_Base):
    """The asyncio twin of Client: the same methods, awaited."""

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, *,
                 timeout: float = 60.0, retries: int = 5, backoff: float = 0.5,
                 max_backoff: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(url, api_key, timeout, retries, backoff, max_backoff)
        self.http = httpx.AsyncClient(base_url=self.url, timeout=timeout,
                                      headers=self._headers(), transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        retry_transport = method in ("GET", "DELETE") or "Idempotency-Key" in kw.get(
            "headers", {})
        for attempt in range(self.retries + 1):
            try:
                r = await self.http.request(method, path, **kw)
            except httpx.TransportError as e:
                if not retry_transport or attempt >= self.retries:
                    raise ServerError(f"{method} {path}: {e!r}") from e
                await asyncio.sleep(self._delay(attempt, None))
                continue
            if r.status_code in RETRY_STATUSES and attempt < self.retries:
                await asyncio.sleep(self._delay(attempt, _retry_after(r.headers)))
                continue
            if r.status_code >= 400:
                raise _response_error(r)
            return r
        raise AssertionError("unreachable")

    async def models(self) -> list[dict[str, Any]]:
        return list((await self.request("GET", "/v1/models")).json()["models"])

    async def model(self, model_id: str) -> dict[str, Any]:
        return dict((await self.request("GET", f"/v1/models/{model_id}")).json())

    async def rollout(self, **kw: Any) -> AsyncRollout:
        body, key = _rollout_params(kw)
        r = await self.request("POST", "/v1/rollouts", json=body,
                               headers=self._post_headers(key))
        return AsyncRollout(self, r.json())

    async def get(self, rollout_id: str) -> AsyncRollout:
        return AsyncRollout(self, (await self.request("GET", f"/v1/rollouts/{rollout_id}")).json())

    def session(self, *, format: str = "png", as_: str = "numpy", timeout: float = 120.0,
                **kw: Any) -> AsyncSession:
        """`async with client.session(...) as s: frame = await s.step("left")`; or
        `s = await client.session(...)` and `await s.close()` at the end."""
        return AsyncSession(self, rollout_body(**kw), format, as_, timeout)

    def _ws(self, url: str) -> Any:
        return aconnect(url, additional_headers=self._headers(), open_timeout=self.timeout,
                        max_size=None, max_queue=None)


class AsyncRollout:
    def __init__(self, client: AsyncClient, doc: dict[str, Any]) -> None:
        self.client, self.doc = client, doc
        self.id: str = doc["id"]
        self.notes: list[str] = list(doc.get("notes", []))

    async def status(self) -> dict[str, Any]:
        self.doc = (await self.client.request("GET", f"/v1/rollouts/{self.id}")).json()
        return self.doc

    async def wait(self, timeout: float | None = None, poll: float = 0.2) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (doc := await self.status())["status"] not in TERMINAL:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"rollout {self.id} still {doc['status']} after {timeout}s")
            await asyncio.sleep(poll)
        return doc

    async def video(self, timeout: float | None = None) -> bytes:
        doc = await self.wait(timeout)
        if doc["status"] == "failed":
            raise RolloutFailed(doc.get("error") or "the rollout failed", body=doc)
        return (await self.client.request("GET", f"/v1/rollouts/{self.id}/video")).content

    async def frame(self, index: int, as_: str = "numpy") -> Any:
        r = await self.client.request("GET", f"/v1/rollouts/{self.id}/frames/{index}")
        return decode_image(r.content, as_)

    async def cancel(self) -> dict[str, Any]:
        self.doc = (await self.client.request("DELETE", f"/v1/rollouts/{self.id}")).json()
        return self.doc

    async def events(self, format: str = "png", after: int = -1, as_: str = "bytes",
                     timeout: float = 120.0) -> AsyncIterator[dict[str, Any]]:
        attempt = 0
        while True:
            url = self.client._ws_url(f"/v1/rollouts/{self.id}/stream", after=after,
                                      format=format)  # fmt: skip
            try:
                async with self.client._ws(url) as ws:
                    parser = _StreamParser(as_)
                    while True:
                        event = parser.feed(await asyncio.wait_for(ws.recv(), timeout))
                        attempt = 0
                        if event is None:
                            continue
                        if "image" in event:
                            after = event["index"]
                        yield event
                        if event["type"] == "done":
                            return
            except (ConnectionClosed, OSError, TimeoutError, InvalidStatus) as e:
                _raise_unless_retryable(self.id, e, attempt, self.client.retries)
                await asyncio.sleep(self.client._delay(attempt, None))
                attempt += 1

    async def frames(self, format: str = "png", as_: str = "numpy", after: int = -1,
                     timeout: float = 120.0) -> AsyncIterator[Any]:
        async for ev in self.events(format, after, as_, timeout):
            if _is_frame(ev):
                yield ev["image"]


class AsyncSession:
    def __init__(self, client: AsyncClient, start: dict[str, Any], format: str, as_: str,
                 timeout: float) -> None:
        self.client, self.start, self.format = client, start, format
        self.as_, self.timeout = as_, timeout
        self.ws: Any = None
        self.ready: dict[str, Any] = {}
        self.context: Any = None
        self.frames_received = 0
        self.queue_position: int | None = None

    id = property(lambda self: self.ready.get("session"))
    fps = property(lambda self: self.ready.get("fps"))
    actions = property(lambda self: self.ready.get("actions"))

    def __await__(self) -> Generator[Any, None, AsyncSession]:
        return self._opened().__await__()

    async def _opened(self) -> AsyncSession:
        """Connected and started (once): what both `await` and `async with` give."""
        if self.ws is None:
            await self._open()
        return self

    async def _open(self) -> None:
        self.ws = await self.client._ws(self.client._ws_url("/v1/sessions"))
        await self.ws.send(json.dumps({"type": "start", **self.start, "format": self.format}))
        try:
            await self._until("context")
        except BaseException:
            await self.ws.close()
            raise

    async def __aenter__(self) -> AsyncSession:
        return await self._opened()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def _until(self, kind: str) -> dict[str, Any]:
        while True:
            try:
                msg = await asyncio.wait_for(self.ws.recv(), self.timeout)
            except ConnectionClosed as e:
                raise SessionEnded(f"the connection closed ({e})") from e
            if isinstance(msg, bytes):
                continue
            doc = _session_message(self, json.loads(msg))
            if doc["type"] in ("frame", "context"):
                raw = await asyncio.wait_for(self.ws.recv(), self.timeout)
                image = decode_image(raw, self.as_)
                if doc["type"] == "context":
                    self.context = image
                else:
                    self.frames_received += 1
                doc["image"] = image
            if doc["type"] == kind:
                return doc

    async def step(self, action: str | int | Sequence[str | int]) -> Any:
        many = isinstance(action, (list, tuple))
        actions = list(action) if isinstance(action, (list, tuple)) else [action]
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(json.dumps({"type": "action", "actions": actions}))
        out = [(await self._until("frame"))["image"] for _ in actions]
        return out if many else out[0]

    async def close(self) -> dict[str, Any] | None:
        done = None
        try:
            await self.ws.send(json.dumps({"type": "stop"}))
            done = await self._until("done")
        except SessionEnded as e:
            done = e.body
        except (ConnectionClosed, OSError, TimeoutError):
            pass
        finally:
            await self.ws.close()
        return done
