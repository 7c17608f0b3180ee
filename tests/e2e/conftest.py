"""Process helpers for end-to-end tests: real `dfserve` processes on free ports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from websockets.sync.client import connect

REDIS_URL = os.environ.get("DFSERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
DFSERVE = Path(sys.executable).parent / "dfserve"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dfserve_cmd(*args: str) -> list[str]:
    """`dfserve ARGS` from this venv (installed by `make`)."""
    return [str(DFSERVE), *args]


class Proc:
    """A child process whose output goes to a file, shown when something goes wrong."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.log = tempfile.NamedTemporaryFile("w+b", prefix="dfserve-e2e-", suffix=".log")
        # One torch thread: the 2-core test machine is shared by several processes.
        # The host's DFSERVE_* variables are not inherited: each test says what it runs on.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("DFSERVE_")}
        full_env = {**inherited, "OMP_NUM_THREADS": "1", "DFSERVE_TORCH_THREADS": "1", **env}
        self.p = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=full_env)

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-6000:]

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, timeout: float = 20) -> int:
        if self.alive():
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        return self.p.returncode


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Processes a test starts; all stopped (SIGTERM) at the end, logs shown on failure."""
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.stop()
        proc.log.close()


def spawn(procs: list[Proc], args: list[str], env: dict[str, str] | None = None) -> Proc:
    proc = Proc(args, env or {})
    procs.append(proc)
    return proc


def wait_ready(base: str, procs: list[Proc], workers: int = 1, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        for proc in procs:
            assert proc.alive(), f"{proc.p.args!r} exited:\n{proc.output()}"
        try:
            r = httpx.get(f"{base}/readyz", timeout=5)
            last = r.text
            warm = [w for w in r.json().get("workers", []) if w.get("warmed_up")]
            if r.status_code == 200 and len(warm) >= workers:
                return
        except httpx.TransportError as e:
            last = repr(e)
        time.sleep(0.2)
    logs = "\n".join(p.output() for p in procs)
    raise AssertionError(f"not ready after {timeout}s: {last}\n{logs}")


def stream(base: str, job_id: str, after: int = -1, fmt: str = "png"
           ) -> tuple[list[tuple[int, bytes]], list[dict[str, Any]]]:
    """Every frame (index, image) and JSON message of a rollout's stream, until done."""
    url = base.replace("http://", "ws://") + f"/v1/rollouts/{job_id}/stream?after={after}" \
                                            f"&format={fmt}"
    frames: list[tuple[int, bytes]] = []
    messages: list[dict[str, Any]] = []
    with connect(url, open_timeout=10, max_size=None, max_queue=None) as ws:
        pending = None
        while True:
            msg = ws.recv(timeout=60)
            if isinstance(msg, bytes):
                assert pending is not None
                frames.append((pending, msg))
                pending = None
                continue
            doc = json.loads(msg)
            messages.append(doc)
            if doc["type"] == "frame":
                pending = doc["index"]
            if doc["type"] in ("done", "error"):
                return frames, messages


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A unique key prefix on the real Redis (which must be up: fail, never skip)."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as e:
        pytest.fail(f"no Redis at {REDIS_URL}: {e}")
    prefix = f"dfserve-e2e-{uuid.uuid4().hex[:12]}"
    yield prefix
    for key in list(client.scan_iter(match=f"{prefix}:*")):
        client.delete(key)
    client.close()
