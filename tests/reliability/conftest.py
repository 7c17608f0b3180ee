"""Helpers for the reliability tests: real processes (tests/e2e/conftest.py), a private
`redis-server` with AOF on a free port (for kill/restart tests), and small HTTP helpers."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.e2e.conftest import (  # noqa: F401 - fixtures, re-exported for this folder
    REDIS_URL,
    Proc,
    free_port,
    procs,
    redis_prefix,
)

TERMINAL = ("succeeded", "failed", "cancelled")


class RedisServer:
    """A private redis-server with appendonly yes / appendfsync always in its own folder,
    which a test may kill -9 and start again on the same port and data."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 15
        while True:
            try:
                if client.ping():
                    break
            except redis.ConnectionError:  # starting, or loading the AOF (BusyLoadingError)
                pass
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        """kill -9: no shutdown save; only what the AOF had fsynced survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP: the port stays open and connections stay up, but nothing is answered (a
        hung Redis, unlike a dead one)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    folder = tmp_path / "redis"
    folder.mkdir()
    server = RedisServer(folder)
    server.start()
    yield server
    server.resume()
    server.kill()


def process_env(redis_url: str | None, prefix: str | None, **extra: Any) -> dict[str, str]:
    env = {"DFSERVE_LEASE_MS": "1500", "DFSERVE_HEARTBEAT_TTL_S": "3",
           "OMP_NUM_THREADS": "1", "DFSERVE_TORCH_THREADS": "1"}
    if redis_url:
        env["DFSERVE_REDIS_URL"] = redis_url
    if prefix:
        env["DFSERVE_REDIS_PREFIX"] = prefix
    env.update({f"DFSERVE_{k.upper()}": str(v) for k, v in extra.items()})
    return env


def post(base: str, expect: int = 202, **body: Any) -> dict[str, Any]:
    r = httpx.post(f"{base}/v1/rollouts", json={"example": "random", **body}, timeout=30)
    assert r.status_code == expect, r.text
    return r.json()


def get(base: str, job_id: str) -> dict[str, Any]:
    r = httpx.get(f"{base}/v1/rollouts/{job_id}", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(base: str, job_id: str, statuses: tuple[str, ...] = TERMINAL,
             timeout: float = 120, procs_: list[Proc] | None = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (doc := get(base, job_id))["status"] not in statuses:
        assert time.monotonic() < deadline, doc
        time.sleep(0.05)
    return doc


def wait_http(base: str, proc: Proc, timeout: float = 60) -> None:
    """Until the process answers /healthz."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.alive(), proc.output()
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"no answer from {base}:\n{proc.output()}")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def hostname_pid(pid: int) -> str:
    import socket

    return f"{socket.gethostname()}:{pid}"

