"""Crash recovery with real processes on the real Redis (DESIGN §6): a worker killed with
SIGKILL mid-rollout loses its lease, another worker reclaims the job and finishes it; a
WebSocket client connected throughout sees every frame index exactly once, and the frames
equal a clean run's (rollouts are deterministic by seed). A poison job that kills every
worker that takes it ends in the dead-letter stream, failed, after K deliveries."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import redis
from websockets.sync.client import connect

from tests.e2e.conftest import REDIS_URL, Proc, dfserve_cmd, free_port, spawn, wait_ready
from tests.reliability.conftest import get, hostname_pid, post, process_env, wait_for

ROOT = Path(__file__).resolve().parents[2]  # the repository: `tests` imports from here


class StreamReader(threading.Thread):
    """A WebSocket client reading one rollout's stream until `done`, in the background."""

    def __init__(self, base: str, job_id: str) -> None:
        super().__init__(daemon=True)
        self.url = base.replace("http://", "ws://") + f"/v1/rollouts/{job_id}/stream?format=png"
        self.frames: list[tuple[int, bytes]] = []
        self.messages: list[dict[str, Any]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with connect(self.url, open_timeout=10, max_size=None, max_queue=None) as ws:
                pending = None
                while True:
                    msg = ws.recv(timeout=120)
                    if isinstance(msg, bytes):
                        self.frames.append((pending, msg))  # type: ignore[arg-type]
                        continue
                    doc = json.loads(msg)
                    self.messages.append(doc)
                    pending = doc.get("index", pending)
                    if doc["type"] in ("done", "error"):
                        return
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e


def start_api(procs: list[Proc], bundle: Path, prefix: str, **extra: Any) -> str:
    port = free_port()
    spawn(procs, dfserve_cmd("api", "--port", str(port), "--model", str(bundle)),
          process_env(REDIS_URL, prefix, **extra))
    return f"http://127.0.0.1:{port}"


def start_worker(procs: list[Proc], bundle: Path, prefix: str, poison: int | None = None,
                 **extra: Any) -> Proc:
    """`dfserve worker`; with `poison`, one that dies on a job with that seed
    (tests/reliability/poison_worker.py, the same worker with a fault injected)."""
    flags = ("worker", "--model", str(bundle), "--max-batch", "2")
    if poison is None:
        return spawn(procs, dfserve_cmd(*flags), process_env(REDIS_URL, prefix, **extra))
    cmd = [sys.executable, "-m", "tests.reliability.poison_worker", str(poison), *flags]
    env = {**process_env(REDIS_URL, prefix, **extra), "PYTHONPATH": str(ROOT)}
    return spawn(procs, cmd, env)


def test_kill9_worker_job_is_reclaimed_and_streamed_exactly_once(
        tiny_bundle_dir: Path, procs: list[Proc], redis_prefix: str) -> None:
    base = start_api(procs, tiny_bundle_dir, redis_prefix)
    first = start_worker(procs, tiny_bundle_dir, redis_prefix)
    wait_ready(base, procs)

    total, params = 120, {"frames": 120, "steps": 3, "seed": 1234, "actions": ["left", "up"]}
    job_id = post(base, **params)["id"]
    reader = StreamReader(base, job_id)
    reader.start()
    deadline = time.monotonic() + 60
    while len(reader.frames) < 5:  # the rollout is well under way on the first worker
        assert time.monotonic() < deadline and reader.error is None, reader.error
        time.sleep(0.01)
    first.p.kill()  # SIGKILL: no release, no goodbye; the lease just stops being renewed
    first.p.wait()
    killed_at = time.monotonic()
    doc = get(base, job_id)
    assert doc["status"] == "running" and doc["worker"] == hostname_pid(first.p.pid), doc
    # frames_done is written just after each frame's XADD: a kill between the two leaves it
    # one behind the stream.
    assert 4 <= doc["progress"]["frames_done"] < total, doc["progress"]

    second = start_worker(procs, tiny_bundle_dir, redis_prefix)
    doc = wait_for(base, job_id, ("running",), timeout=60)
    while doc["worker"] != hostname_pid(second.p.pid):  # reclaimed by the new worker
        assert doc["status"] == "running", doc
        assert time.monotonic() - killed_at < 60, doc
        time.sleep(0.05)
        doc = get(base, job_id)
    assert time.monotonic() - killed_at >= 1.5  # not before the lease ran out
    doc = wait_for(base, job_id, timeout=120)
    reader.join(timeout=60)
    assert reader.error is None, reader.error
    assert doc["status"] == "succeeded", doc
    assert doc["worker"] == hostname_pid(second.p.pid)
    assert any(f"run 2 on {hostname_pid(second.p.pid)}" in n for n in doc["notes"]), doc
    # The connected client saw each index exactly once, in order, across the crash.
    assert [i for i, _ in reader.frames] == list(range(total))
    assert reader.messages[-1] == {"type": "done", "status": "succeeded",
                                   "frames_done": total}

    # The re-run reproduced the crashed run's frames: a clean run with the same seed agrees.
    clean_id = post(base, **params)["id"]
    assert wait_for(base, clean_id, timeout=120)["status"] == "succeeded"
    for i in range(total):
        clean = httpx.get(f"{base}/v1/rollouts/{clean_id}/frames/{i}", timeout=10).content
        assert reader.frames[i][1] == clean, f"frame {i} differs from a clean run"
    mp4 = httpx.get(f"{base}/v1/rollouts/{job_id}/video", timeout=10)
    assert mp4.status_code == 200 and mp4.headers["content-type"] == "video/mp4"


def test_poison_job_is_dead_lettered_after_k_deliveries(
        tiny_bundle_dir: Path, procs: list[Proc], redis_prefix: str) -> None:
    poison = 666
    extra = {"max_deliveries": 2}
    base = start_api(procs, tiny_bundle_dir, redis_prefix, **extra)
    worker = start_worker(procs, tiny_bundle_dir, redis_prefix, poison, **extra)
    wait_ready(base, procs)
    job_id = post(base, frames=3, steps=2, seed=poison)["id"]
    deaths: list[str] = []
    deadline = time.monotonic() + 150
    while (doc := get(base, job_id))["status"] not in ("failed", "succeeded", "cancelled"):
        assert time.monotonic() < deadline, (doc, worker.output())
        if not worker.alive():  # a supervisor (compose, systemd) restarts a dead worker
            assert worker.p.returncode == 1, worker.output()
            assert "TEST ONLY" in worker.output()
            deaths.append(hostname_pid(worker.p.pid))
            procs.remove(worker)
            worker = start_worker(procs, tiny_bundle_dir, redis_prefix, poison, **extra)
        time.sleep(0.1)
    # K = 2 deliveries, each killed its worker; the third claim dead-letters it.
    assert doc["status"] == "failed" and len(deaths) == 2, (doc, deaths)
    assert "gave up after 2 deliveries" in doc["error"] and "lease" in doc["error"], doc
    assert deaths[-1] in doc["error"]  # names the last worker that took it
    client = redis.Redis.from_url(REDIS_URL)
    try:
        entries = client.xrange(f"{redis_prefix}:dead")
    finally:
        client.close()
    dead = [{k.decode(): v.decode() for k, v in f.items()} for _, f in entries]
    assert [d["id"] for d in dead] == [job_id]
    assert dead[0]["deliveries"] == "2" and "lease" in dead[0]["reason"]
    # The worker that dead-lettered it is fine and serves other jobs.
    assert worker.alive()
    ok = post(base, frames=2, steps=2, seed=poison + 1)["id"]
    assert wait_for(base, ok, timeout=60)["status"] == "succeeded"
