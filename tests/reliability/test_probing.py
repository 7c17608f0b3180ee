"""Defects found by probing a running `dfserve api` (issue 13), each checked against a real
API process on the real Redis. No worker runs: the test plays the worker through the queue,
so every job, frame and heartbeat is one the test chose."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from dfserve.server.auth import owner_id
from dfserve.server.queue import JobStatus, Queue
from tests.e2e.conftest import dfserve_cmd
from tests.reliability.conftest import REDIS_URL, Proc, free_port, process_env, wait_http

KEY = "probe-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
STREAMS = 150  # above redis-py's default pool of 100, which each open stream used to hold
POOL = 20  # the API's connections in this test: far fewer than the streams it holds
PNG = b"\x89PNG\r\n\x1a\n"  # frames are stored as given; the streams here ask for PNG


@dataclass
class Api:
    base: str
    queue: Queue  # the test's own view of the API's queue (same Redis and prefix)
    proc: Proc

    @property
    def ws(self) -> str:
        return self.base.replace("http://", "ws://")

    def submit(self, frames: int = 1) -> str:
        params = {"model": "tiny", "context": [], "actions": [0] * frames, "sampling": {}}
        return self.queue.submit(params, frames, owner=owner_id(KEY)).id

    def run_jobs(self, frames: int = 1) -> None:
        """Play the worker: every queued job runs, makes its frames and succeeds."""
        while claimed := self.queue.claim("probe-worker", 64):
            for job in claimed:
                assert self.queue.start(job, "probe-worker")
                for i in range(frames):
                    self.queue.publish_frame(job.id, i, PNG)
                self.queue.finish(job, JobStatus.succeeded)


def start_api(tiny_bundle_dir: Path, prefix: str, **settings: Any) -> tuple[str, Proc]:
    port = free_port()
    env = process_env(REDIS_URL, prefix, api_keys=KEY, **settings)
    proc = Proc(dfserve_cmd("api", "--port", str(port), "--model", str(tiny_bundle_dir)), env)
    base = f"http://127.0.0.1:{port}"
    wait_http(base, proc, timeout=600)
    return base, proc


@pytest.fixture(scope="module")
def api(tiny_bundle_dir: Path) -> Iterator[Api]:
    prefix = f"dfserve-probe-{uuid.uuid4().hex[:10]}"
    base, proc = start_api(tiny_bundle_dir, prefix, redis_max_connections=POOL,
                           max_queued=1000)
    client = redis.Redis.from_url(REDIS_URL)
    queue = Queue(client, prefix=prefix)
    queue.heartbeat("probe-worker", {"warmed_up": True, "host": "probe-secret-host",
                                     "pid": 424242, "jobs": ["probe-secret-job"]}, 3600)
    try:
        yield Api(base, queue, proc)
    finally:
        proc.stop()
        for key in list(client.scan_iter(match=f"{prefix}:*")):
            client.delete(key)
        client.close()


async def next_doc(ws: ClientConnection, skip: tuple[str, ...] = ("queued",)) -> dict[str, Any]:
    """The next JSON message that is not one of `skip` (binary frames are skipped too)."""
    while True:
        msg = await asyncio.wait_for(ws.recv(), 60)
        if isinstance(msg, str) and (doc := json.loads(msg))["type"] not in skip:
            return doc


# --- 1. streams do not hold a Redis connection each -------------------------------------


def test_many_streams_leave_the_api_and_session_cancel_working(api: Api) -> None:
    """150 open streams on a pool of 20 connections: status calls and /readyz answer 200,
    a session whose client leaves is cancelled, and every stream gets its frame and done."""
    jobs = [api.submit() for _ in range(STREAMS)]

    async def scenario() -> tuple[list[int], str, list[list[dict[str, Any]]]]:
        sockets = [await connect(f"{api.ws}/v1/rollouts/{j}/stream?format=png",
                                 additional_headers=AUTH, max_size=None) for j in jobs]
        for ws in sockets:  # every stream is open and has said where its job stands
            assert json.loads(await asyncio.wait_for(ws.recv(), 60))["type"] == "queued"
        codes = []
        async with httpx.AsyncClient(base_url=api.base, headers=AUTH, timeout=60) as http:
            for job in jobs[:30]:
                codes.append((await http.get(f"/v1/rollouts/{job}")).status_code)
            for _ in range(5):
                codes.append((await http.get("/readyz")).status_code)
        session_id = await open_and_leave_a_session(api)
        await asyncio.to_thread(api.run_jobs)
        ends = []
        for ws in sockets:
            got = [await next_doc(ws, skip=("queued", "progress")) for _ in range(3)]
            ends.append(got)
            await ws.close()
        return codes, session_id, ends

    codes, session_id, ends = asyncio.run(scenario())
    assert codes == [200] * 35
    session = api.queue.get(session_id)
    assert session is not None and session.status is JobStatus.cancelled
    for got in ends:
        assert [d["type"] for d in got] == ["started", "frame", "done"], got
        assert got[-1]["status"] == "succeeded"


async def open_and_leave_a_session(api: Api) -> str:
    """Open a session (queued: no worker), then drop the connection; returns its job id."""
    before = queued_ids(api.queue)
    ws = await connect(f"{api.ws}/v1/sessions", additional_headers=AUTH)
    await ws.send(json.dumps({"type": "start", "example": "random"}))
    assert (await next_doc(ws, skip=()))["type"] == "queued"
    (session_id,) = queued_ids(api.queue) - before
    await ws.close()
    for _ in range(600):  # the API cancels it once it sees the disconnect
        job = api.queue.get(session_id)
        if job is not None and job.status.terminal:
            break
        await asyncio.sleep(0.1)
    return session_id


def queued_ids(queue: Queue) -> set[str]:
    return {m.decode() for m in queue.redis.zrange(queue.keys.queued, 0, -1)}


# --- 6. a stream that starts past the last frame -----------------------------------------


def test_stream_after_the_last_frame_of_a_finished_job_ends_at_once(api: Api) -> None:
    job = api.submit(frames=2)
    api.run_jobs(frames=2)

    async def first_message(after: int) -> dict[str, Any]:
        async with connect(f"{api.ws}/v1/rollouts/{job}/stream?after={after}",
                           additional_headers=AUTH) as ws:
            return json.loads(await asyncio.wait_for(ws.recv(), 30))

    for after in (1, 2, 50):
        assert asyncio.run(first_message(after)) == {"type": "done", "status": "succeeded",
                                                     "frames_done": 2}


# --- 7. bad session messages -------------------------------------------------------------


def test_a_session_answers_absurd_messages_with_errors_and_goes_on(api: Api) -> None:
    messages = [
        '{"type": "action", "action": 1' + "0" * 4999 + "}",  # past Python's int limit
        '{"type": "action", "action": ' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"type": "action", "actions": [[[1]]]}',
        '{"type": "action", "action": 1' + "0" * 4000 + "}",  # parses: out of range
    ]

    async def scenario() -> list[dict[str, Any]]:
        async with connect(f"{api.ws}/v1/sessions", additional_headers=AUTH,
                           max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "example": "random"}))
            answers = []
            for text in messages:
                await ws.send(text)
                answers.append(await next_doc(ws))
            await ws.send('{"type": "ping"}')
            answers.append(await next_doc(ws))
            return answers

    *errors, pong = asyncio.run(scenario())
    assert pong == {"type": "pong"}
    for err in errors:
        assert err["type"] == "error" and err["status"] == 422, err
        assert len(json.dumps(err)) < 2000, err


# --- 8. error bodies do not echo a client's input without bound ---------------------------


def test_error_bodies_truncate_echoed_values(api: Api) -> None:
    huge = "m" * 2_000_000
    r = httpx.post(f"{api.base}/v1/rollouts", headers=AUTH, timeout=60,
                   json={"model": huge, "example": "random"})
    assert r.status_code == 422 and r.json()["detail"]["field"] == "model", r.text[:300]
    assert len(r.content) < 2000
    r = httpx.post(f"{api.base}/v1/rollouts", headers=AUTH, timeout=60,
                   json={"x" * 1_000_000: 1, "example": "random"})  # an unknown field's name
    assert r.status_code == 422 and len(r.content) < 2000, r.text[:300]


# --- 9. /readyz without a key ------------------------------------------------------------


def test_readyz_without_a_key_shows_no_internals(api: Api) -> None:
    anonymous = httpx.get(f"{api.base}/readyz", timeout=30)
    with_key = httpx.get(f"{api.base}/readyz", headers=AUTH, timeout=30)
    assert anonymous.status_code == with_key.status_code == 200
    assert anonymous.json() == {"ready": True, "redis": True, "workers": [], "reason": None}
    for secret in ("probe-secret-host", "424242", "probe-secret-job", "probe-worker"):
        assert secret not in anonymous.text
        assert secret in with_key.text  # an operator with a key still sees them


# --- 10. contract gaps -------------------------------------------------------------------


def test_the_openapi_body_schema_refuses_what_the_api_refuses(api: Api) -> None:
    doc = httpx.get(f"{api.base}/openapi.json", timeout=30).json()
    body = doc["paths"]["/v1/rollouts"]["post"]["requestBody"]["content"]["application/json"]
    schema = body["schema"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"example": "random", "context_video": "AAAA"}, schema)
    jsonschema.validate({"example": "random"}, schema)
    r = httpx.post(f"{api.base}/v1/rollouts", headers=AUTH, json={}, timeout=30)
    assert r.status_code == 422  # the API's side of the same contract


def test_options_names_every_method_of_the_path(api: Api) -> None:
    for path, methods in (("/v1/rollouts", {"GET", "POST"}),
                          (f"/v1/rollouts/{uuid.uuid4().hex}", {"GET", "DELETE"})):
        r = httpx.options(f"{api.base}{path}", headers=AUTH, timeout=30)
        assert r.status_code in (200, 204), r.text
        assert methods <= {m.strip() for m in r.headers["allow"].split(",")}, r.headers
        r = httpx.put(f"{api.base}{path}", headers=AUTH, timeout=30)
        assert r.status_code == 405 and methods <= set(r.headers["allow"].split(", "))


@pytest.mark.parametrize("query", ["after=abc", "after=-2", "after=1.5", "format=gif"])
def test_bad_stream_query_values_get_the_error_message(api: Api, query: str) -> None:
    job = api.submit()

    async def scenario() -> tuple[dict[str, Any], int | None]:
        async with connect(f"{api.ws}/v1/rollouts/{job}/stream?{query}",
                           additional_headers=AUTH) as ws:
            doc = json.loads(await asyncio.wait_for(ws.recv(), 30))
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 30)
            return doc, ws.close_code

    doc, code = asyncio.run(scenario())
    assert doc["type"] == "error" and doc["detail"]["field"] == query.split("=")[0], doc
    assert code == 1008


# --- 5. SIGTERM with open ?wait=true requests --------------------------------------------


def test_api_stops_on_sigterm_with_open_wait_requests(tiny_bundle_dir: Path) -> None:
    """`dfserve api` drains for a bounded grace period, then cancels what is still open
    (here requests that would wait an hour for a worker that never comes)."""
    prefix = f"dfserve-probe-{uuid.uuid4().hex[:10]}"
    base, proc = start_api(tiny_bundle_dir, prefix, wait_timeout_s=3600)
    queue = Queue(redis.Redis.from_url(REDIS_URL), prefix=prefix)
    waiting = [threading.Thread(target=_post_and_wait, args=(base,), daemon=True)
               for _ in range(3)]  # fmt: skip
    try:
        for t in waiting:
            t.start()
        for _ in range(1200):
            if queue.queued_count() == len(waiting):
                break
            threading.Event().wait(0.1)
        assert queue.queued_count() == len(waiting)
        proc.p.send_signal(signal.SIGTERM)
        assert proc.p.wait(timeout=120) == 0, proc.output()
    finally:
        proc.stop()
        for key in list(queue.redis.scan_iter(match=f"{prefix}:*")):
            queue.redis.delete(key)


def _post_and_wait(base: str) -> None:
    try:
        httpx.post(f"{base}/v1/rollouts?wait=true", headers=AUTH, timeout=3600,
                   json={"example": "random", "frames": 2})
    except httpx.HTTPError:
        pass  # the server went away: what this test makes it do
