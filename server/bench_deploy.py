"""The service as deployed, for `dfserve bench`: separate `dfserve api` and `dfserve worker`
processes against a real Redis, under a key prefix of their own (DESIGN §8 measures the
service against the bare engine this way, not through the all-in-one `dfserve serve`).

bench_service.py (streamed rollouts) and bench_sessions.py (Play latency) both run on it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import redis

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# The most rollouts the worker steps together, named so the bench does not depend on the
# host's DFSERVE_MAX_BATCH: above the most streams (8) and sessions (16) the bench opens, so
# none of them waits in the queue behind another.
WORKER_MAX_BATCH = 64
READY_TIMEOUT_S = 180.0  # the worker loads and warms the model first
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Deployment:
    url: str  # the API's base URL
    pids: dict[str, int]  # "api", "worker": for their CPU time (cpu_seconds)


def bench_redis_url(flag: str | None = None) -> str:
    """--redis-url, else DFSERVE_REDIS_URL, else the local Redis."""
    return flag or os.environ.get("DFSERVE_REDIS_URL") or DEFAULT_REDIS_URL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def deployed(model: Path, dtype: str, device: str, torch_threads: int,
             redis_url: str) -> Iterator[Deployment]:
    """The two processes, ready (a worker warmed up) when the block starts; both stopped and
    the prefix's keys deleted when it ends."""
    client = _redis_or_error(redis_url)
    prefix = f"dfserve-bench-{uuid.uuid4().hex[:12]}"
    env = _process_env(redis_url, prefix, torch_threads)
    port = free_port()
    cli = [sys.executable, "-m", "dfserve.server.cli"]
    with tempfile.TemporaryDirectory(prefix="dfserve-bench-") as logs:
        procs = []
        try:
            procs.append(_spawn([*cli, "worker", "--model", str(model), "--dtype", dtype,
                                 "--device", device, "--max-batch", str(WORKER_MAX_BATCH)],
                                env, Path(logs) / "worker.log"))  # fmt: skip
            procs.append(_spawn([*cli, "api", "--port", str(port), "--model", str(model)],
                                env, Path(logs) / "api.log"))  # fmt: skip
            url = f"http://127.0.0.1:{port}"
            _wait_ready(url, procs)
            yield Deployment(url, {"worker": procs[0][0].pid, "api": procs[1][0].pid})
        finally:
            for proc, log in procs:
                _stop(proc)
                log.close()
            _delete_prefix(client, prefix)


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) a process has used so far; None where /proc cannot say
    (not Linux). On a shared machine wall-clock ratios move with the neighbours' load, CPU
    time per frame much less."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _redis_or_error(url: str) -> redis.Redis:
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.RedisError as e:  # a ValueError: the CLI prints one line, no traceback
        raise ValueError(f"redis_url: no Redis at {url} ({e}); pass --redis-url or "
                         "DFSERVE_REDIS_URL, or use --engine-only") from None
    return client


def _process_env(redis_url: str, prefix: str, torch_threads: int) -> dict[str, str]:
    """The host's environment less its DFSERVE_* (API keys, a batch limit, another prefix
    would change what is measured), plus what the bench decides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DFSERVE_")}
    return {**env, "DFSERVE_REDIS_URL": redis_url, "DFSERVE_REDIS_PREFIX": prefix,
            "DFSERVE_TORCH_THREADS": str(torch_threads)}


def _spawn(args: list[str], env: dict[str, str], log_path: Path
           ) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    log = log_path.open("w+b")
    return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT), log


def _wait_ready(url: str, procs: list[tuple[subprocess.Popen[bytes], IO[bytes]]]) -> None:
    """Until /readyz answers 200 with a warmed-up worker; a process that exits meanwhile
    fails the bench with the end of its log."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        for proc, log in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited:\n{_tail(log)}")
        try:
            r = httpx.get(f"{url}/readyz", timeout=2)
            if r.status_code == 200 and any(w.get("warmed_up") for w in r.json()["workers"]):
                return
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the service was not ready within {READY_TIMEOUT_S:g} s:\n" +
                       "\n".join(_tail(log) for _, log in procs))  # fmt: skip


def _tail(log: IO[bytes]) -> str:
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")[-4000:]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _delete_prefix(client: redis.Redis, prefix: str) -> None:
    for key in list(client.scan_iter(match=f"{prefix}:*", count=1000)):
        client.delete(key)
    client.close()
