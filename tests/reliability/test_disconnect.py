"""A `POST /v1/rollouts?wait=true` client that hangs up cancels its job: a running rollout
stops within a row and its batch slot serves the next job at once (a real `dfserve serve`
process, max_batch 1, so the slot is visibly the only one)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Proc, dfserve_cmd, free_port, spawn, wait_ready
from tests.reliability.conftest import get, post, process_env, wait_for


def test_wait_client_disconnect_cancels_and_frees_the_slot(tiny_bundle_dir: Path,
                                                           procs: list[Proc]) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    spawn(procs, dfserve_cmd("serve", "--port", str(port), "--model", str(tiny_bundle_dir)),
          process_env(None, None, max_batch=1))  # embedded queue, one batch slot
    wait_ready(base, procs)
    total, idem = 500, {"Idempotency-Key": "wait-and-leave"}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up: its socket closes
        httpx.post(f"{base}/v1/rollouts?wait=true", headers=idem, timeout=2.0,
                   json={"example": "random", "frames": total, "steps": 8})
    left = time.monotonic()
    job_id = httpx.post(f"{base}/v1/rollouts", json={"example": "random"}, headers=idem,
                        timeout=10).json()["id"]  # the same key finds the same job
    doc = wait_for(base, job_id, timeout=30)
    cancelled_after = time.monotonic() - left
    assert doc["status"] == "cancelled", doc
    assert cancelled_after < 3, cancelled_after
    assert 0 < doc["progress"]["frames_done"] < total // 2, doc["progress"]  # it had run
    done = doc["progress"]["frames_done"]
    # The slot is free: the next job (max_batch 1) starts and finishes at once.
    t0 = time.monotonic()
    next_id = post(base, frames=2, steps=2)["id"]
    assert wait_for(base, next_id, timeout=30)["status"] == "succeeded"
    assert time.monotonic() - t0 < 10
    assert get(base, job_id)["progress"]["frames_done"] == done  # and nothing more ran
    # A client that stays gets its MP4.
    r = httpx.post(f"{base}/v1/rollouts?wait=true", timeout=60,
                   json={"example": "random", "frames": 3, "steps": 2})
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
