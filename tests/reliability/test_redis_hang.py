"""A Redis that hangs (SIGSTOP: connections stay open, nothing is answered) instead of dying:
every command has a deadline (DFSERVE_REDIS_TIMEOUT_S), so the API answers 503 instead of
blocking its threads forever, the worker backs off instead of freezing, and both carry on by
themselves when Redis answers again (real processes)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.e2e.conftest import Proc, dfserve_cmd, free_port, spawn, wait_ready
from tests.reliability.conftest import RedisServer, post, process_env, wait_for


def test_a_hung_redis_gives_503s_not_stuck_threads(tiny_bundle_dir: Path, procs: list[Proc],
                                                   own_redis: RedisServer) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = process_env(own_redis.url, "dfserve-hang", redis_timeout_s=2)
    spawn(procs, dfserve_cmd("api", "--port", str(port), "--model", str(tiny_bundle_dir)), env)
    worker = spawn(procs, dfserve_cmd("worker", "--model", str(tiny_bundle_dir)), env)
    wait_ready(base, procs)
    assert wait_for(base, post(base, frames=2, steps=2)["id"])["status"] == "succeeded"

    own_redis.pause()
    # Without a command deadline these calls would hang until the client gives up (30 s)
    # and raise ReadTimeout; with it they come back as 503 after about 2 s.
    r = httpx.get(f"{base}/readyz", timeout=30)
    assert r.status_code == 503 and r.json()["redis"] is False, r.text
    r = httpx.post(f"{base}/v1/rollouts", json={"example": "random", "frames": 2}, timeout=30)
    assert r.status_code == 503 and "Redis" in r.json()["detail"]["message"], r.text
    assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200
    deadline = time.monotonic() + 30
    while "Redis unreachable" not in worker.output():  # its blocking claim timed out
        assert time.monotonic() < deadline, worker.output()
        time.sleep(0.2)
    assert worker.alive()

    own_redis.resume()
    wait_ready(base, procs, timeout=60)
    assert wait_for(base, post(base, frames=2, steps=2)["id"])["status"] == "succeeded"
