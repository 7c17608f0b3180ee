"""Redis killed (-9) and restarted on its AOF, under a running API and worker (real
processes): accepted jobs survive; while Redis is down the API answers 503 with Retry-After
(never 500) on /readyz and on every route that needs Redis, and stays live; the worker's
loop survives with backoff; both reconnect by themselves and every job then succeeds, the
interrupted one re-run from its seed with each frame published exactly once."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.e2e.conftest import Proc, dfserve_cmd, free_port, spawn, stream, wait_ready
from tests.reliability.conftest import RedisServer, get, post, process_env, wait_for


def test_jobs_survive_a_redis_restart_and_the_api_says_503_meanwhile(
        tiny_bundle_dir: Path, procs: list[Proc], own_redis: RedisServer) -> None:
    prefix, port = "dfserve-restart", free_port()
    base = f"http://127.0.0.1:{port}"
    env = process_env(own_redis.url, prefix)
    spawn(procs, dfserve_cmd("api", "--port", str(port), "--model", str(tiny_bundle_dir)), env)
    worker = spawn(procs, dfserve_cmd("worker", "--model", str(tiny_bundle_dir),
                                      "--max-batch", "1"), env)
    wait_ready(base, procs)

    total = 100
    long_id = post(base, frames=total, steps=3, seed=5)["id"]
    while get(base, long_id)["progress"]["frames_done"] < 3:
        time.sleep(0.01)
    queued = [post(base, frames=2, steps=2, seed=10 + i)["id"] for i in range(4)]
    assert get(base, queued[-1])["status"] == "queued"  # max_batch 1: they wait

    doc = get(base, long_id)
    assert doc["status"] == "running" and doc["progress"]["frames_done"] < total, doc
    own_redis.kill()
    time.sleep(0.5)
    r = httpx.get(f"{base}/readyz", timeout=30)
    assert r.status_code == 503 and r.json()["redis"] is False, r.text
    assert "Redis" in r.json()["reason"]
    calls = [("GET", f"/v1/rollouts/{long_id}"), ("DELETE", f"/v1/rollouts/{queued[0]}"),
             ("GET", f"/v1/rollouts/{long_id}/video"), ("GET", f"/v1/rollouts/{long_id}/frames/0"),
             ("POST", "/v1/rollouts")]  # fmt: skip
    for method, path in calls:
        r = httpx.request(method, f"{base}{path}", json={"example": "random", "frames": 2}
                          if method == "POST" else None, timeout=30)  # fmt: skip
        assert r.status_code == 503, (method, path, r.status_code, r.text)
        assert r.headers["retry-after"] == "2" and "Redis" in r.json()["detail"]["message"]
    url = base.replace("http://", "ws://") + f"/v1/rollouts/{long_id}/stream"
    with pytest.raises(ConnectionClosed) as closed, connect(url, open_timeout=10) as ws:
        ws.recv(timeout=30)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013  # try again later
    # What does not need Redis keeps working.
    assert httpx.get(f"{base}/healthz").status_code == 200
    assert httpx.get(f"{base}/v1/models").status_code == 200
    metrics = httpx.get(f"{base}/metrics")
    assert metrics.status_code == 200 and "dfserve_redis_up 0.0" in metrics.text
    time.sleep(2)  # the worker meets the outage and backs off
    assert worker.alive(), worker.output()

    own_redis.start()  # same port, same folder: the AOF is replayed
    wait_ready(base, procs, timeout=60)  # API and worker reconnected by themselves
    assert worker.alive() and "Redis unreachable" in worker.output()
    assert "dropping 1 live jobs" in worker.output()  # it was mid-rollout
    for job_id in [long_id, *queued]:  # every accepted job survived and ran
        doc = wait_for(base, job_id, timeout=120)
        assert doc["status"] == "succeeded", doc
    frames, messages = stream(base, long_id)
    assert [i for i, _ in frames] == list(range(total))  # each index exactly once
    assert messages[-1]["status"] == "succeeded"
    assert wait_for(base, post(base, frames=2, steps=2)["id"])["status"] == "succeeded"
