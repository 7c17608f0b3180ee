"""Soak: a few hundred tiny rollouts from concurrent clients (threads) against a real API
process and worker processes on the real Redis, with random cancels, WebSocket clients
that hang up mid-stream and ?wait=true clients that give up. At the end every job is
accounted for (succeeded + cancelled + failed = submitted, none failed), streams that were
read to the end held each frame once, no key is left without a TTL and once the TTL has
passed only the queue's fixed keys remain, and the API's RSS stayed flat."""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import redis
from websockets.sync.client import connect

from dfserve.server.queue import PENDING_TTL_S
from tests.e2e.conftest import REDIS_URL, Proc, dfserve_cmd, free_port, spawn, wait_ready
from tests.reliability.conftest import TERMINAL, process_env, rss_kb

CLIENTS = 8
JOBS_PER_CLIENT = 100  # 800 in all
OPEN_PER_CLIENT = 4  # a client polls its open jobs before submitting more
JOB_TTL_S = 6
RSS_MARGIN_KB = 24 * 1024  # second half vs first half
FIXED_KEYS = {"jobs", "seq", "stats", "workers"}  # the queue's own keys, no TTL by design


class Client(threading.Thread):
    def __init__(self, base: str, seed: int, rss: RssSampler) -> None:
        super().__init__(daemon=True)
        self.base, self.rng, self.rss = base, random.Random(seed), rss
        self.http = httpx.Client(base_url=base, timeout=30)
        self.final: dict[str, str] = {}
        self.actions: Counter[str] = Counter()
        self.errors: list[str] = []
        self.open: list[str] = []

    def run(self) -> None:
        try:
            for i in range(JOBS_PER_CLIENT):
                if i == JOBS_PER_CLIENT // 2:
                    self.rss.half_done()
                while len(self.open) >= OPEN_PER_CLIENT:
                    self.poll()
                    time.sleep(0.05)
                self.one()
            deadline = time.monotonic() + 120
            while self.open and time.monotonic() < deadline:
                self.poll()
                time.sleep(0.05)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.errors.append(repr(e))
        finally:
            self.http.close()

    def one(self) -> None:
        body = {"example": "random", "frames": self.rng.randint(1, 3),
                "steps": self.rng.randint(1, 2), "seed": self.rng.randrange(2**31)}
        roll = self.rng.random()
        if roll < 0.07:  # ?wait=true, then the client gives up and hangs up
            self.actions["wait_and_leave"] += 1
            idem = {"Idempotency-Key": uuid.uuid4().hex}
            try:
                r = self.http.post("/v1/rollouts?wait=true", json=body, headers=idem,
                                   timeout=0.05)
                if r.status_code == 200:  # it was quicker than the client's patience
                    self.final[r.headers["x-rollout-id"]] = "succeeded"
                    return
            except httpx.TimeoutException:
                pass
            job_id = self.submit(body, idem)
            self.open.append(job_id)
            return
        job_id = self.submit(body, {})
        self.open.append(job_id)
        if roll < 0.25:
            self.actions["cancel"] += 1
            time.sleep(self.rng.random() * 0.05)
            r = self.http.delete(f"/v1/rollouts/{job_id}")
            assert r.status_code == 200, r.text
        elif roll < 0.45:
            self.actions["ws_hang_up"] += 1
            with connect(self.ws_url(job_id), open_timeout=10, max_queue=None) as ws:
                ws.recv(timeout=30)  # one message, then close mid-stream
        elif roll < 0.60:
            self.actions["ws_full"] += 1
            indices, done = self.read_stream(job_id)
            if done["status"] == "succeeded":
                assert indices == list(range(body["frames"])), (indices, done)
        else:
            self.actions["plain"] += 1

    def submit(self, body: dict[str, Any], headers: dict[str, str]) -> str:
        r = self.http.post("/v1/rollouts", json=body, headers=headers)
        assert r.status_code == 202, r.text
        return str(r.json()["id"])

    def ws_url(self, job_id: str) -> str:
        return self.base.replace("http://", "ws://") + f"/v1/rollouts/{job_id}/stream"

    def read_stream(self, job_id: str) -> tuple[list[int], dict[str, Any]]:
        indices: list[int] = []
        with connect(self.ws_url(job_id), open_timeout=10, max_queue=None) as ws:
            while True:
                msg = ws.recv(timeout=60)
                if isinstance(msg, bytes):
                    continue
                doc = json.loads(msg)
                if doc["type"] == "frame":
                    indices.append(doc["index"])
                if doc["type"] in ("done", "error"):
                    return indices, doc

    def poll(self) -> None:
        for job_id in list(self.open):
            doc = self.http.get(f"/v1/rollouts/{job_id}").json()
            if doc["status"] in TERMINAL:
                self.final[job_id] = doc["status"]
                self.open.remove(job_id)


class RssSampler(threading.Thread):
    """The API process's RSS, sampled; the first half ends when half the clients say so."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.stop = pid, threading.Event()
        self.first: list[int] = []
        self.second: list[int] = []
        self._halves = 0
        self._lock = threading.Lock()

    def half_done(self) -> None:
        with self._lock:
            self._halves += 1

    def run(self) -> None:
        while not self.stop.wait(0.2):
            (self.second if self._halves >= CLIENTS // 2 else self.first).append(rss_kb(self.pid))


def test_soak_every_job_accounted_no_orphans_flat_memory(
        tiny_bundle_dir: Path, procs: list[Proc], redis_prefix: str) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = process_env(REDIS_URL, redis_prefix, job_ttl_s=JOB_TTL_S, max_queued=10_000)
    api = spawn(procs, dfserve_cmd("api", "--port", str(port), "--model", str(tiny_bundle_dir)),
                env)
    for _ in range(2):
        spawn(procs, dfserve_cmd("worker", "--model", str(tiny_bundle_dir), "--max-batch", "8"),
              env)
    wait_ready(base, procs, workers=2)

    t0 = time.monotonic()
    rss = RssSampler(api.p.pid)
    rss.start()
    clients = [Client(base, seed, rss) for seed in range(CLIENTS)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(timeout=180)
    rss.stop.set()
    elapsed = time.monotonic() - t0
    errors = [e for c in clients for e in c.errors]
    assert not errors, errors[:5]
    assert all(not c.is_alive() and not c.open for c in clients)

    final = Counter(status for c in clients for status in c.final.values())
    submitted = CLIENTS * JOBS_PER_CLIENT
    actions = sum((c.actions for c in clients), Counter())
    print(f"soak: {submitted} jobs in {elapsed:.1f}s: {dict(final)}; actions {dict(actions)}; "
          f"RSS first half max {max(rss.first)} kB, second half max {max(rss.second)} kB")
    assert sum(len(c.final) for c in clients) == submitted
    assert final["succeeded"] + final["cancelled"] + final["failed"] == submitted
    assert final["failed"] == 0 and final["succeeded"] > submitted // 2, final
    assert actions["cancel"] > 20 and actions["ws_hang_up"] > 20 and actions["wait_and_leave"]

    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        stats = {k: int(v) for k, v in r.hgetall(f"{redis_prefix}:stats").items()}
        assert stats["submitted"] == submitted
        assert sum(v for k, v in stats.items() if k.startswith("finished:")) == submitted, stats
        assert r.xlen(f"{redis_prefix}:jobs") == 0  # acked and deleted
        assert r.xpending(f"{redis_prefix}:jobs", "workers")["pending"] == 0
        assert r.zcard(f"{redis_prefix}:queued") == 0
        # Every job's keys expire: nothing without a TTL beyond the queue's fixed keys.
        for key in r.scan_iter(match=f"{redis_prefix}:*", count=1000):
            name = key.removeprefix(f"{redis_prefix}:")
            assert name in FIXED_KEYS or r.pttl(key) != -1, key  # -1: no TTL (-2: gone)
        time.sleep(JOB_TTL_S + 1)
        left = {k.removeprefix(f"{redis_prefix}:") for k in
                r.scan_iter(match=f"{redis_prefix}:*", count=1000)}  # fmt: skip
        # Job keys are gone. Left: the queue's own keys, worker heartbeats, and the owner's
        # rollout index of GET /v1/rollouts, which lives as long as a job may stay queued
        # (the pending TTL) and is pruned of expired ids as it is read.
        assert {k.split(":")[0] for k in left} <= FIXED_KEYS | {"worker", "owned"}, sorted(left)
        for key in left:
            if key.startswith("owned:"):
                assert 0 < r.ttl(f"{redis_prefix}:{key}") <= PENDING_TTL_S, key
    finally:
        r.close()

    # Memory: flat between the halves (allocator noise and caches allowed for).
    assert len(rss.first) > 5 and len(rss.second) > 5
    assert max(rss.second) - max(rss.first) < RSS_MARGIN_KB, (max(rss.first), max(rss.second))
