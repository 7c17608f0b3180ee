"""End to end: real `dfserve` processes driven over HTTP and WebSocket, as a client would.

- `dfserve serve` alone (embedded queue, worker thread) on a free port;
- `dfserve api` + two `dfserve worker --max-batch 2` processes sharing the real Redis.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from dfserve.server import video
from tests.e2e.conftest import Proc, dfserve_cmd, free_port, spawn, stream, wait_ready


def post(base: str, **body: Any) -> str:
    r = httpx.post(f"{base}/v1/rollouts", json={"example": "random", **body}, timeout=30)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def get(base: str, job_id: str) -> dict[str, Any]:
    return httpx.get(f"{base}/v1/rollouts/{job_id}", timeout=30).json()


def wait_done(base: str, job_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (doc := get(base, job_id))["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, doc
        time.sleep(0.1)
    return doc


def pixels(frames: list[tuple[int, bytes]]) -> np.ndarray:
    return np.stack([video.decode_image(png) for _, png in frames]).astype(int)


def test_serve_one_process(tiny_bundle_dir: Path, procs: list[Proc]) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = spawn(procs, dfserve_cmd("serve", "--host", "127.0.0.1", "--port", str(port),
                                      "--model", str(tiny_bundle_dir)))  # no Redis URL: embedded
    wait_ready(base, procs)
    assert httpx.get(f"{base}/v1/models").json()["default"] == "tiny"
    assert httpx.get(f"{base}/", follow_redirects=False).status_code in (200, 307)

    # Submit, then stream: frame 0 arrives while later frames are still being generated.
    frames = 80
    job_id = post(base, frames=frames, actions=["left", "up"], steps=2)
    url = base.replace("http://", "ws://") + f"/v1/rollouts/{job_id}/stream?format=png"
    from websockets.sync.client import connect

    # max_queue=None: this client stops reading early, and a full receive queue would stall
    # the close handshake in the websockets client (10 s close_timeout).
    with connect(url, max_queue=None) as ws:
        while True:
            msg = ws.recv(timeout=60)
            if isinstance(msg, str) and '"frame"' in msg:
                doc = get(base, job_id)
                assert doc["status"] == "running" and doc["progress"]["frames_done"] < frames
                break
    got, messages = stream(base, job_id)  # a second, late client gets everything
    assert [i for i, _ in got] == list(range(frames))
    assert messages[-1]["type"] == "done" and messages[-1]["status"] == "succeeded"
    rest, _ = stream(base, job_id, after=59)
    assert [i for i, _ in rest] == list(range(60, frames)) and rest == got[60:]
    mp4 = httpx.get(f"{base}/v1/rollouts/{job_id}/video")
    info = video.probe_mp4(mp4.content)
    assert (mp4.headers["content-type"], info.codec, info.pix_fmt, info.frames) == (
        "video/mp4", "h264", "yuv420p", frames)
    for i in (0, 37, frames - 1):
        assert httpx.get(f"{base}/v1/rollouts/{job_id}/frames/{i}").content == got[i][1]

    # Cancel a long rollout after its first frame.
    total = 1500
    r = httpx.post(f"{base}/v1/rollouts", json={"example": "random", "frames": total})
    assert r.status_code == 422 and r.json()["detail"]["field"] == "frames"  # max_frames 512
    long_id = post(base, frames=500, steps=2)
    with connect(url.replace(job_id, long_id), max_queue=None) as ws:
        while not isinstance(ws.recv(timeout=60), bytes):
            pass
        assert httpx.delete(f"{base}/v1/rollouts/{long_id}").status_code == 200
    doc = wait_done(base, long_id)
    assert doc["status"] == "cancelled" and doc["progress"]["frames_done"] < 100, doc
    r = httpx.post(f"{base}/v1/rollouts", json={"example": "random", "sampler": "euler"})
    assert r.status_code == 422 and r.json()["detail"]["accepted"] == ["ddim", "ddpm",
                                                                       "dpmpp_2m"]
    assert "dfserve_frames_generated_total" in httpx.get(f"{base}/metrics").text

    assert server.stop() == 0, server.output()  # SIGTERM: a clean exit


def test_two_workers_share_real_redis_and_batch(tiny_bundle_dir: Path, procs: list[Proc],
                                               redis_prefix: str) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {"DFSERVE_REDIS_URL": "redis://127.0.0.1:6379/0", "DFSERVE_REDIS_PREFIX": redis_prefix,
           "DFSERVE_MODEL": str(tiny_bundle_dir)}
    spawn(procs, dfserve_cmd("api", "--host", "127.0.0.1", "--port", str(port)), env)
    # Four jobs wait in the queue before any worker exists, so the first worker to warm up
    # claims two at once (XREADGROUP COUNT max_batch) and the second worker the other two.
    wait_api = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/healthz").status_code == 200:
                break
        except httpx.TransportError:
            assert time.monotonic() < wait_api, procs[0].output()
            time.sleep(0.2)
    bodies = [{"frames": 250, "steps": 2, "seed": s, "actions": ["left", "right", "up"]}
              for s in (11, 12, 13, 14)]  # fmt: skip
    ids = [post(base, **b) for b in bodies]
    for _ in range(2):
        spawn(procs, dfserve_cmd("worker", "--max-batch", "2", "--device", "cpu"), env)
    wait_ready(base, procs, workers=2)
    docs = [wait_done(base, j) for j in ids]
    assert [d["status"] for d in docs] == ["succeeded"] * 4, docs
    by_worker: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        by_worker.setdefault(d["worker"], []).append(d)
    assert len(by_worker) == 2, {w: [d["id"] for d in ds] for w, ds in by_worker.items()}
    for pair in by_worker.values():  # each worker ran its two jobs as one batch
        assert len(pair) == 2
        a, b = pair
        assert a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"]

    # The same requests run one at a time give the same frames. Batched float math can round
    # a rare pixel differently, so uint8 frames may differ by at most 1.
    batched = [stream(base, j)[0] for j in ids[:2]]
    for body, frames in zip(bodies[:2], batched, strict=True):
        alone = post(base, **body)
        assert wait_done(base, alone)["status"] == "succeeded"
        solo = stream(base, alone)[0]
        assert [i for i, _ in solo] == [i for i, _ in frames] == list(range(250))
        assert np.abs(pixels(solo) - pixels(frames)).max() <= 1
    for proc in procs[1:]:
        assert proc.stop() == 0, proc.output()
