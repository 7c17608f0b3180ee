"""Auth (DESIGN §3): API keys on every /v1 route and WebSocket, ownership of jobs, constant
time comparison, keys never stored nor logged, the per-key rate limit, closed-by-default
CORS. In-process: the app on an embedded (fakeredis) queue, no worker needed."""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import httpx
import pytest
from fastapi.routing import APIRoute, APIWebSocketRoute
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketDenialResponse
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from dfserve.server import auth
from dfserve.server.app import create_app
from dfserve.server.queue import Queue
from dfserve.server.settings import Settings
from tests.e2e.conftest import REDIS_URL, Proc, dfserve_cmd, free_port, spawn
from tests.reliability.conftest import process_env, wait_http

KEYS = ["alpha-0123456789abcdef", "beta-fedcba9876543210"]
ALPHA, BETA = ({"Authorization": f"Bearer {k}"} for k in KEYS)


def make(bundle: Path, **settings: Any) -> tuple[TestClient, Queue, fakeredis.FakeRedis]:
    s = Settings(model=str(bundle), redis_prefix=f"auth-{uuid.uuid4().hex[:8]}", **settings)
    raw = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    queue = Queue(raw, **s.queue_options())
    app = create_app(s, queue)
    client = TestClient(app)
    client.fastapi_app = app  # type: ignore[attr-defined]
    return client, queue, raw


@pytest.fixture
def keyed(tiny_bundle_dir: Path) -> Iterator[tuple[TestClient, Queue, fakeredis.FakeRedis]]:
    client, queue, raw = make(tiny_bundle_dir, api_keys=KEYS)
    with client:
        yield client, queue, raw


def all_routes(routes: list[Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every route with the prefix it is served under (FastAPI keeps included routers as
    `_IncludedRouter` entries that point at the original router)."""
    for route in routes:
        if hasattr(route, "original_router"):
            extra = getattr(getattr(route, "include_context", None), "prefix", "")
            yield from all_routes(route.original_router.routes, prefix + extra)
        else:
            yield prefix, route


def concrete(path: str) -> str:
    return re.sub(r"\{index\}", "0", re.sub(r"\{[a-z_]+\}", "x", path))


def test_every_v1_route_and_websocket_needs_a_valid_key(keyed: Any) -> None:
    client, _, _ = keyed
    http, ws = [], []
    for prefix, route in all_routes(client.fastapi_app.routes):  # type: ignore[attr-defined]
        path = prefix + getattr(route, "path", "")
        if not path.startswith("/v1"):
            continue
        if isinstance(route, APIRoute):
            http += [(m, concrete(path)) for m in route.methods]
        elif isinstance(route, APIWebSocketRoute):
            ws.append(concrete(path))
    assert len(http) >= 7 and ws, (http, ws)  # models, rollouts (+ sessions when present)
    for method, path in http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEYS[0]},
                        {"Authorization": f"Basic {KEYS[0]}"}):  # fmt: skip
            r = client.request(method, path, headers=headers, json={})
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer"
            assert r.json()["detail"]["field"] == "authorization"
    for path in ws:
        for suffix, headers in (("", {}), ("?token=wrong", {}), ("", {"Authorization": "x"})):
            with pytest.raises(WebSocketDenialResponse) as denied:
                with client.websocket_connect(path + suffix, headers=headers):
                    pass
            assert denied.value.status_code == 401, path  # type: ignore[attr-defined]
    # Outside /v1 everything stays open.
    for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/"):
        assert client.get(path, follow_redirects=False).status_code != 401, path
    assert client.get("/v1/models", headers=ALPHA).status_code == 200
    assert client.get("/v1/models", headers=BETA).status_code == 200


def test_a_key_sees_only_its_own_jobs(keyed: Any, caplog: pytest.LogCaptureFixture) -> None:
    client, queue, raw = keyed
    caplog.set_level(logging.DEBUG)
    r = client.post("/v1/rollouts", json={"example": "random", "frames": 2}, headers=ALPHA)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    base = f"/v1/rollouts/{job_id}"
    assert client.get(base, headers=ALPHA).json()["status"] == "queued"
    for method, path in (("GET", base), ("GET", f"{base}/video"), ("GET", f"{base}/frames/0"),
                         ("DELETE", base)):  # fmt: skip
        r = client.request(method, path, headers=BETA)
        assert r.status_code == 403, (method, path, r.text)
        assert r.json()["detail"]["field"] == "id"
    assert client.get(base, headers=ALPHA).json()["status"] == "queued"  # BETA's DELETE: no-op
    with client.websocket_connect(f"{base}/stream", headers=BETA) as ws:
        doc = ws.receive_json()
        assert doc["type"] == "error" and doc["detail"]["field"] == "id"
    # The owner's WebSocket works with the header or with ?token=.
    with client.websocket_connect(f"{base}/stream", headers=ALPHA) as ws:
        assert ws.receive_json() == {"type": "queued", "position": 0}
    with client.websocket_connect(f"{base}/stream?token={KEYS[0]}") as ws:
        assert ws.receive_json() == {"type": "queued", "position": 0}
    # Idempotency keys are per API key: the same header gives each key its own job.
    idem = {"Idempotency-Key": "same"}
    a = client.post("/v1/rollouts", json={"example": "random"}, headers={**ALPHA, **idem})
    b = client.post("/v1/rollouts", json={"example": "random"}, headers={**BETA, **idem})
    assert a.json()["id"] != b.json()["id"]
    # The job stores a hash of the key as its owner; no key is anywhere in Redis or the logs.
    job = queue.get(job_id)
    assert job is not None and job.owner == auth.owner_id(KEYS[0]) != KEYS[0]
    dump = b"".join(k + repr(raw.dump(k)).encode() for k in raw.keys("*"))
    logs = caplog.text
    for key in KEYS:
        assert key.encode() not in dump and key not in logs
    assert client.delete(base, headers=ALPHA).json()["status"] == "cancelled"


def test_a_session_belongs_to_the_key_that_opened_it(keyed: Any) -> None:
    client, queue, raw = keyed
    with client.websocket_connect("/v1/sessions", headers=ALPHA) as ws:
        ws.send_json({"type": "start", "example": "random"})
        assert ws.receive_json()["type"] == "queued"  # no worker here: it stays queued
        (key,) = raw.keys(queue.keys.job("*"))
        session_id = key.decode().rsplit(":", 1)[1]
        job = queue.get(session_id)
        assert job is not None and job.owner == auth.owner_id(KEYS[0])
        assert client.get(f"/v1/rollouts/{session_id}", headers=ALPHA).status_code == 200
        r = client.get(f"/v1/rollouts/{session_id}", headers=BETA)
        assert r.status_code == 403 and r.json()["detail"]["field"] == "id"
        assert client.delete(f"/v1/rollouts/{session_id}", headers=BETA).status_code == 403


def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    checker = auth.KeyChecker(["k1", "k2", "k3"])
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for key, valid in (("k1", True), ("k3", True), ("nope", False), ("k1" * 1000, False)):
        calls.clear()
        assert checker.valid(key) is valid
        # Every configured key is compared, whichever matches, over fixed-length digests.
        assert len(calls) == 3 and {len(a) for a, b in calls} == {len(b) for a, b in calls} == {32}


def test_rate_limit_per_key(tiny_bundle_dir: Path) -> None:
    client, _, _ = make(tiny_bundle_dir, api_keys=KEYS, rate_limit_per_min=3)
    with client:
        for _ in range(3):
            assert client.get("/v1/models", headers=ALPHA).status_code == 200
        r = client.get("/v1/models", headers=ALPHA)
        assert r.status_code == 429 and r.json()["detail"]["message"].startswith("rate limit")
        assert 1 <= int(r.headers["retry-after"]) <= 20  # one token per 20 s
        with pytest.raises(WebSocketDenialResponse) as denied:  # WebSockets count too
            with client.websocket_connect("/v1/rollouts/x/stream", headers=ALPHA):
                pass
        assert denied.value.status_code == 429  # type: ignore[attr-defined]
        assert client.get("/v1/models", headers=BETA).status_code == 200  # its own bucket
        assert client.get("/healthz").status_code == 200  # not limited
    # The bucket refills continuously: per_min tokens a minute, bursts up to per_min.
    now = [0.0]
    buckets = auth.TokenBuckets(60, clock=lambda: now[0])
    assert all(buckets.take("a") == 0 for _ in range(60))
    assert buckets.take("a") == pytest.approx(1.0)
    now[0] += 0.5
    assert buckets.take("a") == pytest.approx(0.5)
    now[0] += 0.5
    assert buckets.take("a") == 0 and buckets.take("b") == 0


def test_rate_limit_without_keys_is_per_client(tiny_bundle_dir: Path) -> None:
    client, _, _ = make(tiny_bundle_dir, rate_limit_per_min=2)
    with client:
        assert [client.get("/v1/models").status_code for _ in range(3)] == [200, 200, 429]


def test_cors_is_closed_by_default_and_configurable(tiny_bundle_dir: Path) -> None:
    preflight = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    closed, _, _ = make(tiny_bundle_dir)
    with closed:
        r = closed.get("/v1/models", headers={"Origin": "http://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        r = closed.options("/v1/rollouts", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
    good = "http://viewer.example"
    opened, _, _ = make(tiny_bundle_dir, cors_origins=[good], api_keys=KEYS)
    with opened:
        r = opened.get("/v1/models", headers={"Origin": good, **ALPHA})
        assert r.headers["access-control-allow-origin"] == good
        r = opened.options("/v1/rollouts", headers={**preflight, "Origin": good,
                                                    "Access-Control-Request-Headers":
                                                    "authorization"})  # fmt: skip
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == good
        r = opened.get("/v1/models", headers={"Origin": good})  # a 401 the browser can read
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == good
        r = opened.get("/v1/models", headers={"Origin": "http://evil.example", **ALPHA})
        assert "access-control-allow-origin" not in r.headers


def test_keys_never_reach_the_server_log(tiny_bundle_dir: Path, procs: list[Proc],
                                         redis_prefix: str) -> None:
    """A real `dfserve api` process with its access log on: keys sent as Bearer headers or
    as ?token= (WebSocket) never appear in its output, valid or not."""
    port = free_port()
    base, ws_base = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}"
    api = spawn(procs, dfserve_cmd("api", "--port", str(port), "--model", str(tiny_bundle_dir)),
                process_env(REDIS_URL, redis_prefix, api_keys=",".join(KEYS)))
    wait_http(base, api)
    r = httpx.post(f"{base}/v1/rollouts", json={"example": "random"}, headers=ALPHA)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert httpx.get(f"{base}/v1/rollouts/{job_id}", headers=BETA).status_code == 403
    assert httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer guess"}
                     ).status_code == 401  # fmt: skip
    with ws_connect(f"{ws_base}/v1/rollouts/{job_id}/stream?token={KEYS[0]}&after=-1") as ws:
        assert json.loads(ws.recv(timeout=10)) == {"type": "queued", "position": 0}
    with pytest.raises(InvalidStatus) as denied:
        with ws_connect(f"{ws_base}/v1/rollouts/{job_id}/stream?token=not-{KEYS[1]}"):
            pass
    assert denied.value.response.status_code == 401
    time.sleep(0.5)
    out = api.output()
    assert "WebSocket /v1/rollouts" in out and "/v1/models" in out  # the access log is on
    for secret in (*KEYS, "guess"):
        assert secret not in out, secret
