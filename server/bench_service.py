"""Service half of `dfserve bench`: the service as deployed (separate `dfserve api` and
`dfserve worker` processes on a real Redis, bench_deploy.py), driven over HTTP and WebSocket,
against the bare engine with the same torch threads.

`api_overhead` is the service's delivered frames/s with 8 rollouts POSTed at once and each
streamed over its WebSocket (all frames / seconds from the first POST to the last `done`)
over the engine's batched frames/s on the same 8 rollouts: what the API, Redis, PNG encoding
and the sockets cost a worker that is kept busy. On a shared machine that ratio moves with
the neighbours' load, so the CPU time per delivered frame of each process (worker, API) is
reported too, against the engine's own (`cpu_ms_per_frame_8`, `api_overhead_cpu`). Play
latency is bench_sessions.py's.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import httpx
import torch
from websockets.sync.client import connect

from dfserve.model.bundle import Bundle
from dfserve.model.rollout import RolloutEngine
from dfserve.server.bench_deploy import Deployment, bench_redis_url, cpu_seconds, deployed
from dfserve.server.bench_rollouts import make_request, run_concurrent, timed
from dfserve.server.bench_sessions import session_figures
from dfserve.server.settings import Settings

STREAMS = 8  # concurrent streams of the api_overhead figure
T = TypeVar("T")


def stream_rollout(url: str, body: dict[str, Any]) -> tuple[float, float, int]:
    """POST a rollout and stream it: (seconds to first frame, seconds to done, frames)."""
    start = time.perf_counter()
    job = httpx.post(f"{url}/v1/rollouts", json=body, timeout=30).json()
    ws_url = url.replace("http", "ws") + f"/v1/rollouts/{job['id']}/stream?format=png"
    first, frames = None, 0
    with connect(ws_url, max_size=None) as ws:
        for message in ws:
            if isinstance(message, bytes):
                frames += 1
                first = first or time.perf_counter() - start
            elif json.loads(message).get("type") == "done":
                break
    return first or float("nan"), time.perf_counter() - start, frames


def stream_together(url: str, bodies: list[dict[str, Any]]) -> tuple[float, int]:
    """Every rollout POSTed at once (a barrier releases the threads together) and streamed:
    frames delivered per second from the first POST to the last `done`, and the frames."""
    barrier = threading.Barrier(len(bodies) + 1)

    def one(body: dict[str, Any]) -> int:
        barrier.wait()
        return stream_rollout(url, body)[2]

    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(one, body) for body in bodies]
        barrier.wait()
        start = time.perf_counter()
        frames = sum(f.result() for f in futures)
    return frames / (time.perf_counter() - start), frames


def service_torch_threads(device: torch.device) -> int:
    """The worker's torch threads, set explicitly and used by the bare engine too: on a CPU,
    one core fewer than the machine has, which the API process (on the same machine here)
    needs; DFSERVE_TORCH_THREADS wins."""
    settings = Settings()
    if settings.torch_threads:
        return settings.torch_threads
    if device.type != "cpu":
        return torch.get_num_threads()
    return max(1, (os.cpu_count() or 1) - 1)


def service_figures(path: Path, bundle: Bundle, dtype: str, quick: bool,
                    redis_url: str | None = None) -> dict[str, Any]:
    """Time to first frame (median of several, warm); one stream's and 8 streams' frames/s
    against the bare engine's; Play sessions' key -> frame latency."""
    frames = 16 if quick else 48
    examples = sorted(bundle.examples())
    body: dict[str, Any] = {"frames": frames, "seed": 0}
    if examples:
        body["example"] = examples[0]
    device = next(bundle.network.parameters()).device
    threads = service_torch_threads(device)
    with deployed(path, dtype, str(device), threads, bench_redis_url(redis_url)) as service:
        url = service.url
        stream_rollout(url, {**body, "frames": 2})  # warm-up
        ttffs = [stream_rollout(url, {**body, "frames": 2})[0] for _ in range(3 if quick else 5)]
        _, total, got = stream_rollout(url, body)
        service_fps = got / total
        bodies = [{**body, "seed": i} for i in range(STREAMS)]
        (service_fps_8, frames_8), cpu = with_cpu(service, lambda: stream_together(url, bodies))
        sessions = session_figures(url, examples[0] if examples else None, quick)
    engine_fps, engine_fps_8, engine_cpu = _bare_engine_fps(bundle, frames, threads)
    out = {
        "ttff_ms": 1000 * statistics.median(ttffs),
        "service_fps": service_fps,
        "api_overhead_1": service_fps / engine_fps,
        "service_fps_8": service_fps_8,
        "engine_fps_8": engine_fps_8,
        "api_overhead": service_fps_8 / engine_fps_8,
        "service_torch_threads": threads,
        "session_latency": sessions,
    }
    if cpu is not None and sum(cpu.values()) > 0:  # /proc counts in clock ticks (10 ms)
        per_frame = {name: 1000 * seconds / frames_8 for name, seconds in cpu.items()}
        per_frame["engine"] = 1000 * engine_cpu
        out["cpu_ms_per_frame_8"] = per_frame
        out["api_overhead_cpu"] = per_frame["engine"] / (per_frame["worker"] + per_frame["api"])
    return out


def with_cpu(service: Deployment, fn: Callable[[], T]) -> tuple[T, dict[str, float] | None]:
    """fn's value and the CPU seconds each of the service's processes spent meanwhile (None
    where the platform does not say)."""
    before = {name: cpu_seconds(pid) for name, pid in service.pids.items()}
    value = fn()
    after = {name: cpu_seconds(pid) for name, pid in service.pids.items()}
    spent = {name: a - b for name, a in after.items() if a is not None
             and (b := before[name]) is not None}  # fmt: skip
    return value, spent if len(spent) == len(service.pids) else None


def _bare_engine_fps(bundle: Bundle, frames: int, threads: int) -> tuple[float, float, float]:
    """The engine alone, with the threads the service's worker uses, warm: frames/s of one
    rollout, and of the 8 rollouts that service_figures streams, stepped together, and the
    CPU seconds per frame of the latter."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        engine = RolloutEngine(bundle, next(bundle.network.parameters()).device)
        run_concurrent(engine, [make_request(bundle, 4)])  # warm-up
        one = timed(lambda: run_concurrent(engine, [make_request(bundle, frames)]),
                    engine.device)  # fmt: skip
        reqs = [make_request(bundle, frames, seed=i) for i in range(STREAMS)]
        cpu = time.process_time()
        together = timed(lambda: run_concurrent(engine, reqs), engine.device)
        cpu = time.process_time() - cpu
    finally:
        torch.set_num_threads(before)
    return frames / one, STREAMS * frames / together, cpu / (STREAMS * frames)
