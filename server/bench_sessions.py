"""Play latency for `dfserve bench`: WS /v1/sessions driven as the Play page drives it, with
1, 4 and 16 sessions at once (DESIGN §8).

Each session ticks at the model's fps (the `ready` message says it) and sends one action per
tick, skipping the tick while MAX_IN_FLIGHT actions are unanswered, as clients/web/app.js
does to keep latency low. Action i produces frame i (routes/sessions.py), so key -> frame
latency is the time from sending action i to receiving frame i's header. A session that the
service cannot keep up with shows it twice: skipped ticks lower its frames/s, and the latency
grows towards MAX_IN_FLIGHT frames' worth of work.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect

MAX_IN_FLIGHT = 2  # clients/web/app.js: `s.inflight >= 2` skips the tick
SESSION_COUNTS = (1, 4, 16)
DONE_TIMEOUT_S = 30.0  # after `stop`, how long the `done` message is awaited
FRAME_TIMEOUT_S = 120.0  # a session with no frame for this long has failed


@dataclass
class SessionRun:
    """One session's clock readings: when each action went out and its frame came back."""

    sent: dict[int, float] = field(default_factory=dict)  # action index -> send time
    received: dict[int, float] = field(default_factory=dict)  # frame index -> receive time

    def latencies(self) -> list[float]:
        return [self.received[i] - self.sent[i] for i in self.received if i in self.sent]

    def frame_rate(self) -> float:
        """Frames/s from the first frame to the last: the model's fps while the service
        keeps up, less when ticks are skipped."""
        times = sorted(self.received.values())
        return (len(times) - 1) / (times[-1] - times[0])


def session_figures(url: str, example: str | None, quick: bool) -> dict[str, dict[str, float]]:
    """{"1": {p50_ms, p99_ms, fps, total_fps}, "4": ..., "16": ...}, after a warm-up session;
    fps is frames/s per session (the mean over sessions), total_fps all sessions together."""
    frames = 6 if quick else 64  # >= 2: a rate needs two frames
    ws_url = url.replace("http", "ws", 1) + "/v1/sessions"
    asyncio.run(play_together(ws_url, example, 1, 3))  # warm-up
    return {str(n): summarize(asyncio.run(play_together(ws_url, example, n, frames)))
            for n in SESSION_COUNTS}  # fmt: skip


async def play_together(ws_url: str, example: str | None, sessions: int, frames: int
                        ) -> list[SessionRun]:
    return list(await asyncio.gather(*(play(ws_url, example, frames, seed)
                                       for seed in range(sessions))))  # fmt: skip


async def play(ws_url: str, example: str | None, frames: int, seed: int) -> SessionRun:
    """One session: start, `frames` actions on the fps clock, stop, `done`."""
    start: dict[str, Any] = {"type": "start", "format": "png", "seed": seed}
    if example is not None:
        start["example"] = example
    run = SessionRun()
    async with connect(ws_url, max_size=None, open_timeout=30) as ws:
        await ws.send(json.dumps(start))
        ready = await _until(ws, "ready")
        actions = len(ready["actions"]) or 1
        receiver = asyncio.create_task(_receive_frames(ws, run, frames))
        await _tick(ws, run, frames, actions, 1 / ready["fps"], receiver)
        await asyncio.wait_for(receiver, FRAME_TIMEOUT_S)
        await ws.send(json.dumps({"type": "stop"}))
        await asyncio.wait_for(_until(ws, "done"), DONE_TIMEOUT_S)
    return run


async def _tick(ws: ClientConnection, run: SessionRun, frames: int, actions: int,
                period: float, receiver: asyncio.Task[None]) -> None:
    """Send action k (cycling through the model's actions) at the next tick of the fps clock
    that finds fewer than MAX_IN_FLIGHT actions unanswered; ticks do not catch up."""
    loop = asyncio.get_running_loop()
    next_tick = loop.time()
    while len(run.sent) < frames:
        await asyncio.sleep(max(0.0, next_tick - loop.time()))
        next_tick += period
        if receiver.done():  # it failed: its exception is raised by the caller's wait
            return
        if len(run.sent) - len(run.received) >= MAX_IN_FLIGHT:
            continue
        k = len(run.sent)
        run.sent[k] = time.perf_counter()
        await ws.send(json.dumps({"type": "action", "action": k % actions}))


async def _receive_frames(ws: ClientConnection, run: SessionRun, frames: int) -> None:
    """Record when each frame's header arrives, until `frames` frames."""
    while len(run.received) < frames:
        doc = await _next_json(ws)
        if doc["type"] == "frame":
            run.received[doc["index"]] = time.perf_counter()
        elif doc["type"] in ("done", "error"):
            raise RuntimeError(f"the session ended early: {doc}")


async def _until(ws: ClientConnection, kind: str) -> dict[str, Any]:
    """The next JSON message of this type, skipping the others (queued, context, frames)."""
    while True:
        doc = await _next_json(ws)
        if doc["type"] == kind:
            return doc
        if doc["type"] in ("done", "error"):
            raise RuntimeError(f"the session ended before {kind!r}: {doc}")


async def _next_json(ws: ClientConnection) -> dict[str, Any]:
    """The next text message; images (after a frame or context header) are skipped unread."""
    while True:
        message = await asyncio.wait_for(ws.recv(), FRAME_TIMEOUT_S)
        if isinstance(message, str):
            doc: dict[str, Any] = json.loads(message)
            return doc


def summarize(runs: list[SessionRun]) -> dict[str, float]:
    """Latency percentiles over every frame of every session; frames/s as the rate frames
    arrive (first to last), per session (the mean) and all sessions together (the sum)."""
    latencies = np.array([lat for run in runs for lat in run.latencies()])
    per_session = [run.frame_rate() for run in runs]
    return {"p50_ms": 1000 * float(np.percentile(latencies, 50)),
            "p99_ms": 1000 * float(np.percentile(latencies, 99)),
            "fps": float(np.mean(per_session)), "total_fps": float(np.sum(per_session))}
