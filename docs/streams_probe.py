"""Hold N WebSocket streams on one `dfserve api` process and time status calls meanwhile:
the figures of docs/reliability.md.

    python docs/streams_probe.py --streams 1000 --calls 300 [--redis redis://127.0.0.1:6379/0]

It starts one API process (the packaged default model's config; no worker), submits N jobs
straight into the queue, opens one stream per job, then, with all of them open, times
`GET /v1/rollouts/{id}` and `/readyz` calls one after another. Last it plays the worker
(one frame and `done` per job, through the queue) and checks that every stream delivered
both. Prints one JSON document; keys are deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import redis
from websockets.asyncio.client import ClientConnection, connect

from dfserve.server.queue import JobStatus, Queue

PNG = b"\x89PNG\r\n\x1a\n"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_api(redis_url: str, prefix: str, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DFSERVE_REDIS_URL": redis_url, "DFSERVE_REDIS_PREFIX": prefix,
           "DFSERVE_MAX_QUEUED": "100000"}
    exe = Path(sys.executable).parent / "dfserve"
    return subprocess.Popen([str(exe), "api", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_up(base: str, proc: subprocess.Popen[bytes]) -> None:
    while True:
        assert proc.poll() is None, "the API process exited"
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def hold_and_probe(base: str, queue: Queue, jobs: list[str], calls: int, pid: int
                         ) -> dict[str, Any]:
    ws_base = base.replace("http://", "ws://")
    started = time.perf_counter()
    sockets: list[ClientConnection] = []
    for job in jobs:
        sockets.append(await connect(f"{ws_base}/v1/rollouts/{job}/stream?format=png",
                                     max_size=None, open_timeout=60))
    for ws in sockets:
        assert json.loads(await asyncio.wait_for(ws.recv(), 60))["type"] == "queued"
    opened_s = time.perf_counter() - started
    latencies, codes = [], []
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        for i in range(calls):
            t = time.perf_counter()
            r = await http.get(f"/v1/rollouts/{jobs[i % len(jobs)]}")
            latencies.append((time.perf_counter() - t) * 1000)
            codes.append(r.status_code)
        ready = [(await http.get("/readyz")).status_code for _ in range(10)]
    holding_rss = rss_mb(pid)
    t = time.perf_counter()
    await asyncio.to_thread(play_worker, queue)
    delivered = 0
    for ws in sockets:
        seen = set()
        while "done" not in seen:
            msg = await asyncio.wait_for(ws.recv(), 120)
            if isinstance(msg, str):
                seen.add(json.loads(msg)["type"])
        delivered += {"frame", "done"} <= seen
        await ws.close()
    return {"streams": len(jobs), "open_s": round(opened_s, 1),
            "status_calls": calls, "status_p50_ms": round(statistics.median(latencies), 1),
            "status_p99_ms": round(percentile(latencies, 0.99), 1),
            "status_5xx": sum(c >= 500 for c in codes), "readyz": sorted(set(ready)),
            "api_rss_mb_holding": round(holding_rss),
            "delivered_frame_and_done": delivered,
            "deliver_all_s": round(time.perf_counter() - t, 1)}


def play_worker(queue: Queue) -> None:
    """Every queued job starts, publishes one frame and succeeds (what a worker would do)."""
    while claimed := queue.claim("probe-worker", 256):
        for job in claimed:
            queue.start(job, "probe-worker")
            queue.publish_frame(job.id, 0, PNG)
            queue.finish(job, JobStatus.succeeded)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    prefix = f"dfserve-probe-{uuid.uuid4().hex[:10]}"
    client = redis.Redis.from_url(args.redis)
    queue = Queue(client, prefix=prefix)
    queue.heartbeat("probe-worker", {"warmed_up": True}, 3600)
    jobs = [queue.submit({"model": "probe", "context": [], "sampling": {}}, 1).id
            for _ in range(args.streams)]  # fmt: skip
    proc = start_api(args.redis, prefix, args.port)
    base = f"http://127.0.0.1:{args.port}"
    try:
        wait_up(base, proc)
        result = asyncio.run(hold_and_probe(base, queue, jobs, args.calls, proc.pid))
        result |= {"cpu": cpu_name(),
                   "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
        print(json.dumps(result, indent=1))
    finally:
        proc.terminate()
        proc.wait(30)
        for key in list(client.scan_iter(match=f"{prefix}:*")):
            client.delete(key)


if __name__ == "__main__":
    main()
