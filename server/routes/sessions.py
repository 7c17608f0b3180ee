"""WS /v1/sessions: interactive play (DESIGN §3). The API never loads the model: a session is a
long-lived job that a worker keeps in its batch (server/worker.py), fed through Redis.

Protocol (JSON text messages, plus one binary message after each image header):

    client: {"type": "start", "model"?, "example" | "context" | "context_video",
             "context_actions"?, schedule, sampler, steps, eta, guidance, ..., "chunk_size"?
             (default 1: every action is answered at once), "seed"?, "format"?: jpeg | png}
    server: {"type": "queued", "position"}        while waiting for a worker's batch slot
    server: {"type": "ready", "session", "model", "fps", "actions", "context_frames",
             "resolution", "format", "seed", "sampling"}
    server: {"type": "context", "index": -1} + binary: the last context frame (what the first
             action acts on), so a viewer has a picture before the first step
    client: {"type": "action", "action": name | index}  or  {"type": "action", "actions": [...]}
    server: per generated frame {"type": "frame", "index": i, "action": name} + binary
    client: {"type": "ping"} -> {"type": "pong"};  {"type": "stop"} ends the session
    server: {"type": "error", "status", "detail": {field, message, accepted?}} for a bad message
            (the session goes on, unless it is the start message)
    server: {"type": "done", "status", "error"?, "reason"?, "frames_done"} last, then close

Actions sent before `ready` are kept and played once a worker has the session. A session ends
(its job cancelled, its batch slot freed within one row) when the client disconnects or sends
`stop`, after settings.session_idle_s without a client message (the worker enforces the same
bound on its side), or when the worker fails it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, WebSocket
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocketDisconnect

from dfserve.model.bundle import action_index
from dfserve.model.config import BundleConfig
from dfserve.model.errors import FieldError
from dfserve.server import video
from dfserve.server.catalog import Catalog
from dfserve.server.errors import ApiError, field_error, validation_error
from dfserve.server.inputs import decode_context
from dfserve.server.jobs import JobSpec, enqueue, job_spec
from dfserve.server.queue import Event, Job, Queue
from dfserve.server.routes.deps import CatalogDep, HubDep, OwnerDep, QueueDep, SettingsDep
from dfserve.server.schemas import SessionStart
from dfserve.server.settings import Settings
from dfserve.server.streams import EventHub, pump_events

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/sessions", tags=["sessions"])

FORMATS = ("jpeg", "png")
MAX_PENDING = 64  # actions sent but not yet answered; more is a client outrunning the model
STOP_GRACE_S = 10.0  # after stop/idle, how long the `done` message is awaited before closing


class _Conn:
    """One session's socket: sends are serialised so a frame header and its image stay
    adjacent although two tasks (pump, receiver) write."""

    def __init__(self, ws: WebSocket, queue: Queue, hub: EventHub, job: Job,
                 config: BundleConfig, fmt: str) -> None:
        self.ws, self.queue, self.hub, self.job = ws, queue, hub, job
        self.config, self.fmt = config, fmt
        self.lock = asyncio.Lock()
        self.actions: list[int] = []  # every action pushed, in order: action i makes frame i
        self.sent = 0  # frames sent
        self.reason: str | None = None  # why the API ended the session (stop, idle)

    async def send(self, doc: dict[str, Any], image: bytes | None = None) -> None:
        async with self.lock:
            await self.ws.send_json(doc)
            if image is not None:
                await self.ws.send_bytes(image)

    async def error(self, err: ApiError) -> None:
        await self.send({"type": "error", "status": err.status, **err.body()})

    def image(self, png: bytes) -> bytes:
        return png if self.fmt == "png" else video.encode_jpeg(video.decode_image(png))


@router.websocket("")
async def session(ws: WebSocket, settings: SettingsDep, queue: QueueDep, hub: HubDep,
                  catalog: CatalogDep, owner: OwnerDep) -> None:
    """Interactive play: `start`, then `action` messages each answered by the next frame."""
    await ws.accept()
    try:
        raw = await asyncio.wait_for(ws.receive_text(), settings.session_idle_s)
        start = _parse_start(raw)
        job, config, ready, context_png = await run_in_threadpool(
            _open, start, settings, queue, catalog, owner)
    except ApiError as e:
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await ws.send_json({"type": "error", "status": e.status, **e.body()})
            await ws.close(code=1008)
        return
    except (TimeoutError, WebSocketDisconnect, RuntimeError, KeyError):
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await ws.close(code=1008)
        return
    conn = _Conn(ws, queue, hub, job, config, start.format)
    log.info("session %s opened (%s)", job.id, ready["model"])
    pump = asyncio.create_task(_pump(conn, ready, context_png))
    receiver = asyncio.create_task(_receive(conn, settings))
    try:
        await asyncio.wait({pump, receiver}, return_when=asyncio.FIRST_COMPLETED)
        left = receiver.done() and receiver.exception() is None and receiver.result()
        await run_in_threadpool(queue.cancel, job.id)  # frees the worker's slot within a row
        if not pump.done() and not left:  # stop/idle: let the client see `done`
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(pump), STOP_GRACE_S)
    except (WebSocketDisconnect, RuntimeError):
        await run_in_threadpool(queue.cancel, job.id)
    finally:
        for task in (pump, receiver):
            task.cancel()
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await ws.close()
        log.info("session %s closed (%s)", job.id, conn.reason or "ended")


def _parse_start(raw: str) -> SessionStart:
    try:
        # annotated: SessionStart's base is generated (create_model), so mypy sees Any
        start: SessionStart = SessionStart.model_validate_json(raw)
    except ValidationError as e:
        err = validation_error(e.errors(include_url=False), SessionStart)
        if err.field == "type":
            err = ApiError(422, "type", "the first message must be a start message", ["start"])
        raise err from None
    if start.format not in FORMATS:
        raise ApiError(422, "format", f"{start.format!r} is not supported", list(FORMATS))
    return start


def _open(start: SessionStart, settings: Settings, queue: Queue, catalog: Catalog,
          owner: str | None) -> tuple[Job, BundleConfig, dict[str, Any], bytes]:
    """Check the start message as the worker will run it, queue the session's job."""
    model_id, config = catalog.config(start.model)
    try:
        ctx = decode_context(
            config, context=start.context, context_video=start.context_video,
            example=start.example, examples=lambda: catalog.examples(model_id),
            max_pixels=settings.max_image_pixels,
            max_request_pixels=settings.max_request_pixels)  # fmt: skip
        spec = job_spec(start, model_id, config, ctx, settings.max_frames)
    except FieldError as e:
        raise field_error(e) from None
    job = enqueue(queue, spec, owner)  # only its key may read its job
    return job, config, _ready(spec, job, config, start.format), spec.context[-1]


def _ready(spec: JobSpec, job: Job, config: BundleConfig, fmt: str) -> dict[str, Any]:
    """The `ready` message, sent when a worker has taken the session."""
    return {"type": "ready", "session": job.id, "model": spec.model, "fps": spec.fps,
            "actions": list(config.data.action_names), "context_frames": len(spec.context),
            "resolution": config.network.resolution, "format": fmt, "seed": spec.seed,
            "sampling": asdict(spec.sampling)}


async def _pump(conn: _Conn, ready: dict[str, Any], context_png: bytes) -> None:
    """Events from Redis -> the client: queued positions, ready + context, frames, done."""
    async def deliver(ev: Event) -> bool:
        return await _send_event(conn, ev, ready, context_png)

    expired = ApiError(404, "session", "the session has expired")
    await pump_events(conn.queue, conn.hub, conn.job, -1, conn.send, deliver,
                      {"type": "error", "status": expired.status, **expired.body()})


async def _send_event(conn: _Conn, ev: Event, ready: dict[str, Any], context_png: bytes
                      ) -> bool:
    """Send one event of the session's job; True after `done`."""
    names = conn.config.data.action_names
    if ev.type == "started":
        await conn.send({**ready, "worker": ev.data.get("worker")})
        image = await run_in_threadpool(conn.image, context_png)
        await conn.send({"type": "context", "index": -1}, image)
    elif ev.type == "frame" and ev.png is not None and ev.index is not None:
        image = await run_in_threadpool(conn.image, ev.png)
        action = conn.actions[ev.index] if ev.index < len(conn.actions) else None
        name = names[action] if action is not None and action < len(names) else action
        await conn.send({"type": "frame", "index": ev.index, "action": name}, image)
        conn.sent = ev.index + 1
    elif ev.type == "done":
        doc: dict[str, Any] = {"type": "done", "status": ev.status.value if ev.status else None,
                               "frames_done": ev.data.get("frames_done", conn.sent)}
        if ev.data.get("error"):
            doc["error"] = ev.data["error"]
        if conn.reason:
            doc["reason"] = conn.reason
        await conn.send(doc)
        return True
    return False


async def _receive(conn: _Conn, settings: Settings) -> bool:
    """Client messages -> the session's action stream. Returns True when the client left
    (nothing more can be sent), False when the session should end with a `done` (stop, idle).
    """
    idle = settings.session_idle_s
    limit = conn.config.max_rollout_frames
    while True:
        try:
            msg = await asyncio.wait_for(conn.ws.receive(), idle)
        except TimeoutError:
            conn.reason = f"idle: no message for {idle:g} s"
            return False
        if msg["type"] == "websocket.disconnect":
            conn.reason = "disconnected"
            return True
        doc = _json_message(msg.get("text") or "")
        kind = doc.get("type") if isinstance(doc, dict) else None
        if kind == "stop":
            conn.reason = "stopped by the client"
            return False
        if kind == "ping":
            await conn.send({"type": "pong"})
            continue
        if kind != "action":
            await conn.error(ApiError(422, "type", "expected a JSON message with a known type",
                                      ["action", "stop", "ping"]))
            continue
        try:
            actions = _actions(doc, conn.config)
            if len(conn.actions) + len(actions) > limit:
                raise ApiError(422, "actions", f"a session makes at most {limit} frames")
            if len(conn.actions) + len(actions) - conn.sent > MAX_PENDING:
                raise ApiError(429, "actions", f"more than {MAX_PENDING} actions are waiting "
                               "for their frames: wait for frames before sending more")
        except ApiError as e:
            await conn.error(e)
            continue
        conn.actions += actions
        await run_in_threadpool(conn.queue.push_actions, conn.job.id, actions)


def _json_message(text: str) -> Any:
    """A client message, or None when it is no JSON this server reads: besides malformed
    JSON, numbers of more than 4,300 digits (ValueError, Python's int limit) and nesting
    deeper than the parser's recursion limit (RecursionError) are refused, not fatal."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return None


def _actions(doc: dict[str, Any], config: BundleConfig) -> list[int]:
    if "actions" in doc:
        given, name = doc["actions"], "actions"
        if not isinstance(given, list) or not given:
            raise ApiError(422, "actions", "must be a non-empty list of action names or indices")
    elif "action" in doc:
        given, name = [doc["action"]], "action"
    else:
        raise ApiError(422, "action", "an action message needs `action` or `actions`",
                       list(config.data.action_names))
    for a in given:  # before action_index, whose message would repr a 100k-deep list
        if isinstance(a, bool) or not isinstance(a, (int, str)):
            raise ApiError(422, name, f"a {type(a).__name__} is not an action name or index",
                           list(config.data.action_names))
    try:
        return [action_index(config, a, name) for a in given]
    except FieldError as e:
        raise field_error(e) from None
