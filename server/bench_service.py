"""Service half of `dfserve bench`: time to first frame and API overhead through a real
`dfserve serve` process (API + queue + worker), driven over HTTP and WebSocket."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import torch
from websockets.sync.client import connect

from dfserve.model.bundle import Bundle
from dfserve.model.rollout import RolloutEngine
from dfserve.server.bench_rollouts import make_request, run_concurrent, timed
from dfserve.server.serve import embedded_torch_threads
from dfserve.server.settings import Settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serving(model: Path, dtype: str = "float32") -> Iterator[str]:
    """`dfserve serve` on a free port, ready (worker warmed up) when the block starts."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "DFSERVE_REDIS_URL"}  # embedded queue
    proc = subprocess.Popen(
        [sys.executable, "-m", "dfserve.server.cli", "serve", "--port", str(port),
         "--model", str(model), "--dtype", dtype],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError("dfserve serve exited during start-up")
            time.sleep(0.2)
        else:
            raise RuntimeError("dfserve serve was not ready within 180 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


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


def service_figures(path: Path, bundle: Bundle, dtype: str, quick: bool) -> dict[str, Any]:
    """Time to first frame (median of several, warm) and the service's streaming speed against
    the bare engine's on the same rollout with the same torch threads (medians of 3)."""
    frames = 16 if quick else 96
    examples = sorted(bundle.examples())
    body: dict[str, Any] = {"frames": frames, "seed": 0}
    if examples:
        body["example"] = examples[0]
    with serving(path, dtype) as url:
        stream_rollout(url, {**body, "frames": 2})  # warm-up
        ttffs = [stream_rollout(url, {**body, "frames": 2})[0] for _ in range(3 if quick else 5)]
        service_fps = []
        for _ in range(3):
            _, total, got = stream_rollout(url, body)
            service_fps.append(got / total)
    threads = embedded_torch_threads(Settings()) or torch.get_num_threads()
    bare_fps = _bare_engine_fps(bundle, frames, threads)
    return {
        "ttff_ms": 1000 * statistics.median(ttffs),
        "service_fps": statistics.median(service_fps),
        "service_torch_threads": threads,
        "api_overhead": statistics.median(service_fps) / bare_fps,
    }


def _bare_engine_fps(bundle: Bundle, frames: int, threads: int) -> float:
    """The engine alone, with the threads the service's worker uses (median of 3, warm)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        engine = RolloutEngine(bundle, next(bundle.network.parameters()).device)
        run_concurrent(engine, [make_request(bundle, 4)])  # warm-up
        runs = [timed(lambda: run_concurrent(engine, [make_request(bundle, frames)]),
                      engine.device) for _ in range(3)]  # fmt: skip
    finally:
        torch.set_num_threads(before)
    return frames / statistics.median(runs)
