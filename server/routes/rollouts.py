"""/v1/rollouts: submit, inspect, download, cancel and stream rollout jobs (DESIGN §3).

Route functions that only call the synchronous Queue are sync (FastAPI runs them in its
threadpool). POST is async because it reads a JSON or multipart body itself; its decoding and
validation (images, model.request.resolve) then run in the threadpool. The WebSocket reads
frames from Redis (queue.events), never from a worker's memory, and waits for news on the
process's one event hub (server/streams.py), which holds no thread or connection per socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response, WebSocket
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.websockets import WebSocketDisconnect

from dfserve.server import video
from dfserve.server.catalog import Catalog
from dfserve.server.errors import ApiError, clip, validation_error
from dfserve.server.inputs import Upload, decode_context
from dfserve.server.jobs import enqueue, job_notes, job_spec, shown_params
from dfserve.server.queue import Event, Job, JobStatus, Queue
from dfserve.server.routes.deps import (
    CatalogDep,
    HubDep,
    OwnedJobDep,
    OwnerDep,
    QueueDep,
    SettingsDep,
    job_not_found,
    visible_job,
)
from dfserve.server.schemas import (
    ErrorBody,
    JobState,
    Links,
    Progress,
    RolloutCreated,
    RolloutList,
    RolloutParams,
    RolloutState,
    RolloutStatus,
    RolloutSummary,
)
from dfserve.server.settings import Settings
from dfserve.server.streams import pump_events

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/rollouts", tags=["rollouts"])

FILE_FIELDS = ["files", "context", "context_video"]  # multipart file fields
MAX_PAGE = 100  # GET /v1/rollouts: most jobs per page
WAIT_POLL_S = 0.05  # ?wait=true: how often the job and the client's connection are checked
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (401, 403, 404, 409, 413, 415, 422, 429, 503)}

# A JSON body needs exactly one context source (server/inputs.py); the schema says so, so that
# a client generated from it never sends `{}`. Multipart bodies may bring theirs as files.
_ONE_SOURCE = {"oneOf": [{"required": [name]} for name in ("context", "context_video",
                                                          "example")]}
_BODY_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {**RolloutParams.model_json_schema(), **_ONE_SOURCE}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "params": {"type": "string", "description": "RolloutParams as JSON"},
        "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "context images and/or videos, in order"}}}},
}}}  # fmt: skip


def links(job_id: str) -> Links:
    base = f"/v1/rollouts/{job_id}"
    return Links(self=base, video=f"{base}/video", stream=f"{base}/stream",
                 frames=f"{base}/frames/{{i}}")


def shown_status(job: Job, cancelling: bool) -> RolloutState:
    """The status the API shows: a running job whose cancel flag is set is "cancelling"."""
    if cancelling and job.status is JobStatus.running:
        return "cancelling"
    return job.status.value


def job_state(job: Job, cancelling: bool) -> JobState:
    return JobState(
        id=job.id, status=shown_status(job, cancelling),
        progress=Progress(frames_done=job.frames_done, frames_total=job.frames_total),
        queue_position=job.queue_position, created_at=job.created_at,
        started_at=job.started_at, finished_at=job.finished_at, error=job.error,
    )  # fmt: skip


def summary(job: Job, cancelling: bool) -> RolloutSummary:
    return RolloutSummary(**dict(job_state(job, cancelling)), links=links(job.id))


def status_doc(job: Job, queue: Queue, catalog: Catalog) -> RolloutStatus:
    """The job in full: its state, worker, effective parameters, notes and links."""
    cancelling = job.status is JobStatus.running and queue.is_cancelled(job.id)
    names = catalog.action_names(job.params.get("model", ""))
    return RolloutStatus(**dict(job_state(job, cancelling)), worker=job.worker,
                         params=shown_params(job.params, names), notes=job_notes(job),
                         links=links(job.id))


# ------------------------------------------------------------------------------- submit


@router.post("", status_code=202, response_model=RolloutCreated, openapi_extra=_BODY_DOC,
             responses={**ERRORS, 200: {"content": {"video/mp4": {}},
                                        "description": "with ?wait=true: the finished MP4"}})
async def create_rollout(
    request: Request,
    settings: SettingsDep,
    queue: QueueDep,
    catalog: CatalogDep,
    owner: OwnerDep,
    wait: Annotated[bool, Query(description="block until done and return the MP4")] = False,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> Any:
    """Queue a rollout. JSON body, or multipart with image/video files plus a `params` field."""
    params, files = await _read_body(request)
    job, notes = await run_in_threadpool(_submit, params, files, settings, queue, catalog,
                                         idempotency_key, owner)
    created = RolloutCreated(id=job.id, status=job.status, queue_position=job.queue_position,
                             links=links(job.id), notes=notes)
    if not wait:
        return created
    final = await _wait(request, queue, job.id, settings.wait_timeout_s)
    if final is None or not final.status.terminal:  # timed out: the job goes on
        return JSONResponse(created.model_dump(mode="json"), status_code=202,
                            headers={"Location": created.links.self})
    if final.status is JobStatus.succeeded and (mp4 := await run_in_threadpool(
            queue.video, job.id)):  # fmt: skip
        return Response(mp4, media_type="video/mp4",
                        headers={"Location": created.links.self, "X-Rollout-Id": job.id})
    raise ApiError(409, None, f"rollout {job.id} {final.status.value}: {final.error or ''}",
                   headers={"Location": created.links.self})


async def _read_body(request: Request) -> tuple[RolloutParams, list[Upload]]:
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if kind == "multipart/form-data":
        files: list[Upload] = []
        raw = "{}"
        async with request.form(max_files=256, max_fields=8) as form:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile) and key in FILE_FIELDS:
                    files.append(Upload(value.filename or "", value.content_type or "",
                                        await value.read(), field=key))
                elif key == "params" and isinstance(value, str):
                    raw = value
                else:
                    raise ApiError(422, key, "unknown form field (or a file where text is "
                                   "expected)", ["params", *FILE_FIELDS])  # fmt: skip
        return _parse(raw, whole="params"), files
    if kind != "application/json":
        raise ApiError(415, "content-type", f"{kind!r} is not supported",
                       ["application/json", "multipart/form-data"])
    return _parse(await request.body()), []


def _parse(raw: str | bytes, whole: str | None = None) -> RolloutParams:
    """The params; an error about the document as a whole (not JSON, not an object) names
    `whole`, the multipart field it came in."""
    try:
        # annotated: RolloutParams's base is generated (create_model), so mypy sees Any
        params: RolloutParams = RolloutParams.model_validate_json(raw or b"{}")
        return params
    except ValidationError as e:
        err = validation_error(e.errors(include_url=False), RolloutParams)
        if err.field is None:
            err.field = whole
        raise err from None


def _submit(params: RolloutParams, files: list[Upload], settings: Settings, queue: Queue,
            catalog: Catalog, idempotency_key: str | None,
            owner: str | None = None) -> tuple[Job, list[str]]:
    model_id, config = catalog.config(params.model)
    _check_limits(params, files, settings)
    ctx = decode_context(
        config, context=params.context, context_video=params.context_video,
        example=params.example, files=files, examples=lambda: catalog.examples(model_id),
        max_pixels=settings.max_image_pixels,
        max_request_pixels=settings.max_request_pixels)  # fmt: skip
    spec = job_spec(params, model_id, config, ctx, settings.max_frames)
    job = enqueue(queue, spec, owner, idempotency_key)
    return job, job_notes(job)


def _check_limits(params: RolloutParams, files: list[Upload], settings: Settings) -> None:
    """The server's own limits, checked before any decoding (the bundle adds its own)."""
    if params.steps is not None and params.steps > settings.max_steps:
        raise ApiError(422, "steps", f"{params.steps} is above this server's limit of "
                       f"{settings.max_steps}", f"1..{settings.max_steps}")
    for name, given in (("context", len(params.context or [])), ("files", len(files))):
        if given > settings.max_context_frames:
            raise ApiError(422, name, f"{given} context frames; this server accepts at most "
                           f"{settings.max_context_frames}", f"1..{settings.max_context_frames}")


async def _wait(request: Request, queue: Queue, job_id: str, timeout_s: float) -> Job | None:
    """Poll the job until it ends or the timeout passes. A client that disconnects while
    waiting cancels its job, so a running rollout frees its batch slot within one row."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        job = await run_in_threadpool(queue.get, job_id)
        if job is None or job.status.terminal or loop.time() >= deadline:
            return job
        if await request.is_disconnected():
            log.info("the ?wait=true client of job %s left: cancelling it", job_id)
            return await run_in_threadpool(queue.cancel, job_id)
        await asyncio.sleep(WAIT_POLL_S)


# ------------------------------------------------------------------------------- inspect


@router.get("", response_model=RolloutList, responses=ERRORS)
def list_rollouts(
    queue: QueueDep,
    owner: OwnerDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="jobs per page")] = 20,
    cursor: Annotated[str | None, Query(max_length=20,
                                        description="next_cursor of the previous page")] = None,
) -> RolloutList:
    """The caller's rollouts (its API key's, when auth is on), newest first, a page at a time;
    jobs leave the list when they expire (DFSERVE_JOB_TTL_S after they end)."""
    if cursor is not None and not (cursor.isascii() and cursor.isdigit()):
        raise ApiError(422, "cursor", f"{cursor!r} is not a next_cursor of this API")
    jobs, after = queue.list_jobs(owner, limit, int(cursor) if cursor is not None else None)
    flagged = queue.cancelled(j.id for j in jobs if j.status is JobStatus.running)
    return RolloutList(rollouts=[summary(j, j.id in flagged) for j in jobs],
                       next_cursor=None if after is None else str(after))


@router.get("/{rollout_id}", response_model=RolloutStatus, responses=ERRORS)
def get_rollout(job: OwnedJobDep, queue: QueueDep, catalog: CatalogDep) -> RolloutStatus:
    return status_doc(job, queue, catalog)


@router.delete("/{rollout_id}", response_model=RolloutStatus, responses=ERRORS)
def cancel_rollout(job: OwnedJobDep, queue: QueueDep, catalog: CatalogDep) -> RolloutStatus:
    """Cancel: a queued job never runs; a running one stops within one denoising row (it
    shows as "cancelling" until then)."""
    cancelled = queue.cancel(job.id)
    if cancelled is None:
        raise job_not_found(job.id)
    return status_doc(cancelled, queue, catalog)


@router.get("/{rollout_id}/video", response_class=Response,
            responses={**ERRORS, 200: {"content": {"video/mp4": {}}}})
def get_video(job: OwnedJobDep, queue: QueueDep) -> Response:
    """The MP4 (H.264, yuv420p, faststart); 409 while the job is not finished."""
    if job.status is not JobStatus.succeeded:
        what = (f"{job.frames_done}/{job.frames_total} frames" if not job.status.terminal
                else job.error or "no video")
        raise ApiError(409, None, f"the video is not available: the rollout is "
                       f"{job.status.value} ({what})", headers={"Retry-After": "1"})
    mp4 = queue.video(job.id)
    if mp4 is None:
        raise ApiError(404, "id", "the video has expired")
    return Response(mp4, media_type="video/mp4",
                    headers={"Content-Disposition": f'inline; filename="{job.id}.mp4"'})


@router.get("/{rollout_id}/frames/{index}", response_class=Response,
            responses={**ERRORS, 200: {"content": {"image/png": {}}}})
def get_frame(rollout_id: str, index: int, job: OwnedJobDep, queue: QueueDep) -> Response:
    """One generated frame as PNG, as soon as it is clean."""
    # (rollout_id is OwnedJobDep's too: named here first, the document lists it first)
    png = queue.frame_png(rollout_id, index)
    if png is not None:
        return Response(png, media_type="image/png")
    if not 0 <= index < job.frames_total:
        raise ApiError(404, "index", f"{index} is out of range", f"0..{job.frames_total - 1}")
    raise ApiError(409, "index", f"frame {index} is not generated (the rollout is "
                   f"{job.status.value}, {job.frames_done} frames done)",
                   headers={"Retry-After": "1"})  # fmt: skip


# ------------------------------------------------------------------------------- stream


@router.websocket("/{rollout_id}/stream")
async def stream(
    ws: WebSocket,
    rollout_id: str,
    queue: QueueDep,
    hub: HubDep,
    owner: OwnerDep,
    # Plain strings, checked after the handshake: a value FastAPI refused would close the
    # handshake with a bare HTTP 403, where the client must get the error message instead.
    after: Annotated[str, Query(description="last frame index already seen (>= -1)")] = "-1",
    fmt: Annotated[str, Query(alias="format", description="jpeg or png")] = "jpeg",
) -> None:
    """Control messages as JSON; per frame a JSON header {type: frame, index} and then one
    binary message (the image); {type: done, status, error?} last, then close. A refused
    request gets {type: error, detail: {field, message, accepted?}} and the close code 4404
    (no such job), 4403 (another key's job) or 1008 (a bad `after` or `format`)."""
    await ws.accept()
    job = await run_in_threadpool(queue.get, rollout_id)
    try:
        job = visible_job(job, rollout_id, owner)
        _check_stream_query(after, fmt)
    except ApiError as err:
        await ws.send_json({"type": "error", **err.body()})
        await ws.close(code=REFUSAL_CODES.get(err.status, 1008))
        return
    gone = asyncio.Event()
    watcher = asyncio.create_task(_watch_disconnect(ws, gone))
    # `done` follows the last frame: a cursor past the frames would wait for events that
    # never come (after >= frames_total of a finished job), so start at the last frame.
    start = min(int(after), max(job.frames_total, job.frames_done) - 1)

    async def deliver(ev: Event) -> bool:
        return await _send_event(ws, ev, fmt, job.frames_total)

    try:
        await pump_events(queue, hub, job, start, ws.send_json, deliver,
                          {"type": "error", **job_not_found(job.id).body()}, gone)
    except (WebSocketDisconnect, RuntimeError):  # the client left mid-send
        pass
    finally:
        watcher.cancel()


REFUSAL_CODES = {404: 4404, 403: 4403}  # a stream's close code per refusal; else 1008


def _check_stream_query(after: str, fmt: str) -> None:
    if not _is_index(after):
        raise ApiError(422, "after", f"{clip(after)!r} is not a frame index: an integer "
                       ">= -1 (the last frame already seen)")  # fmt: skip
    if fmt not in ("jpeg", "png"):
        raise ApiError(422, "format", f"{clip(fmt)!r} is not supported", ["jpeg", "png"])


def _is_index(text: str) -> bool:
    digits = text[1:] if text.startswith("-") else text
    return 0 < len(digits) <= 20 and digits.isascii() and digits.isdigit() and int(text) >= -1


async def _watch_disconnect(ws: WebSocket, gone: asyncio.Event) -> None:
    try:
        while (await ws.receive())["type"] != "websocket.disconnect":
            pass  # clients have nothing to say on this socket
    finally:
        gone.set()


async def _send_event(ws: WebSocket, ev: Event, fmt: str, total: int) -> bool:
    """Send one event; True after `done` (the socket is then closed)."""
    if ev.type == "started":
        await ws.send_json({"type": "started", "worker": ev.data.get("worker")})
    elif ev.type == "frame" and ev.png is not None and ev.index is not None:
        image = ev.png if fmt == "png" else await run_in_threadpool(_jpeg, ev.png)
        await ws.send_json({"type": "frame", "index": ev.index})
        await ws.send_bytes(image)
        await ws.send_json({"type": "progress", "frames_done": ev.index + 1,
                            "frames_total": total})
    elif ev.type == "done":
        status = ev.status.value if ev.status else None
        extra = {k: ev.data.get(k) for k in ("error", "frames_done")}
        await ws.send_json({"type": "done", "status": status,
                            **{k: v for k, v in extra.items() if v is not None}})
        with contextlib.suppress(RuntimeError):
            await ws.close()
        return True
    return False


def _jpeg(png: bytes) -> bytes:
    return video.encode_jpeg(video.decode_image(png))

