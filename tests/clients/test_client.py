"""The Python client against a real `dfserve serve` process (tests/clients/conftest.py)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest

from dfserve.clients import (
    AsyncClient,
    BadRequest,
    Client,
    Conflict,
    Forbidden,
    NotFound,
    QueueFull,
    ServerError,
    SessionEnded,
    Unauthorized,
)
from dfserve.clients.client import Progress, Rollout, RolloutStatus
from dfserve.model.bundle import find_bundles
from dfserve.server import video
from tests.clients.conftest import Server
from tests.e2e.conftest import DFSERVE

# The packaged bundles are always served, beside the test server's `tiny` default.
SERVED_MODELS = sorted({*find_bundles(), "tiny"})


@pytest.fixture
def client(server: Server) -> Any:
    with Client(server.url, retries=2) as c:
        yield c
    server.cancel_all()


def test_models(client: Client) -> None:
    models = {m["id"]: m for m in client.models()}
    assert sorted(models) == SERVED_MODELS
    tiny = models["tiny"]
    assert tiny["actions"] == ["noop", "left", "right", "up"]
    assert client.model("tiny")["examples"] == ["random"]


def test_rollout_wait_video(client: Client) -> None:
    r = client.rollout(example="random", frames=12, seed=1, steps=2)
    doc = r.wait(timeout=120)
    assert doc.status == "succeeded" and doc.progress == Progress(frames_done=12,
                                                                  frames_total=12)
    assert doc.params["seed"] == 1 and doc.params["steps"] == 2 and doc.finished
    frames = video.decode_video(r.video())
    assert len(frames) == 12 and frames[0].shape == (16, 16, 3)


def test_streamed_frames_equal_the_stored_ones(client: Client) -> None:
    n = 10
    r = client.rollout(example="random", frames=n, seed=2, actions=["left", "up"])
    streamed = list(r.frames(format="png", as_="bytes"))  # starts while queued or running
    assert len(streamed) == n
    for i, png in enumerate(streamed):  # exactly the PNGs the server stored
        assert png == client.http.get(f"/v1/rollouts/{r.id}/frames/{i}").content
    arrays = list(r.frames(as_="numpy"))  # a late reader replays the whole stream
    assert all(np.array_equal(a, video.decode_image(p)) for a, p in zip(arrays, streamed,
                                                                         strict=True))
    assert np.array_equal(r.frame(3), arrays[3]) and r.frame(3, as_="pil").size == (16, 16)
    # H.264 is lossy, and its 4:2:0 chroma cannot follow 16x16 random pixels: compare luma,
    # which it keeps within a few levels; each decoded frame is nearest its own streamed one.
    luma = np.array([0.299, 0.587, 0.114])
    decoded = np.stack(video.decode_video(r.video())) @ luma  # (n, 16, 16)
    dist = np.abs(decoded[:, None] - (np.stack(arrays) @ luma)[None]).mean(axis=(2, 3))
    assert np.diag(dist).max() < 8, np.diag(dist)
    assert list(dist.argmin(axis=1)) == list(range(n))
    assert [np.array_equal(a, b) for a, b in zip(list(r.frames(after=6)), arrays[7:],
                                                 strict=True)] == [True] * 3


def test_a_dropped_stream_resumes_after_the_last_frame(client: Client, monkeypatch) -> None:
    """The first connection dies after 3 frames; the iterator reconnects with after=2."""
    from websockets.exceptions import ConnectionClosedError

    r = client.rollout(example="random", frames=8, seed=3)
    expected = list(r.frames(as_="bytes"))
    urls: list[str] = []
    real = Client._ws

    class Flaky:
        def __init__(self, ws: Any) -> None:
            self.ws, self.images = ws, 0

        def close(self) -> None:
            self.ws.close()

        def recv(self, timeout: float | None = None) -> Any:
            if self.images == 3:
                raise ConnectionClosedError(None, None)
            msg = self.ws.recv(timeout=timeout)
            self.images += isinstance(msg, bytes)
            return msg

    def flaky_ws(self: Client, url: str) -> Any:
        urls.append(url)
        ws = real(self, url)
        return Flaky(ws) if len(urls) == 1 else ws

    monkeypatch.setattr(Client, "_ws", flaky_ws)
    assert list(r.frames(as_="bytes")) == expected
    assert "after=-1" in urls[0] and "after=2" in urls[1] and len(urls) == 2


def test_cancel(client: Client) -> None:
    r = client.rollout(example="random", frames=500, seed=4, steps=8)
    events = r.events()
    assert next(ev for ev in events if ev["type"] == "frame")["index"] == 0
    assert r.cancel().status in ("cancelling", "cancelled")  # under way, or already done
    rest = [ev for ev in events if ev["type"] != "frame"]
    assert rest[-1]["type"] == "done" and rest[-1]["status"] == "cancelled"
    doc = r.wait(timeout=30)
    assert doc.status == "cancelled" and doc.progress.frames_done < 500
    with pytest.raises(Conflict) as e:
        r.video()
    assert e.value.status == 409


def test_session_steps(client: Client, server: Server) -> None:
    actions: list[str | int] = ["left", "up", "up", "right", 0, "left"]
    with client.session(example="random", seed=7, steps=3) as s:
        assert s.actions == ["noop", "left", "right", "up"] and s.fps == 8
        assert s.ready["context_frames"] == 2 and s.ready["sampling"]["chunk_size"] == 1
        assert s.context.shape == (16, 16, 3)
        first = [s.step(a) for a in actions[:3]] + s.step(actions[3:])
        assert len(first) == 6 and s.frames_received == 6
        session_id = s.id
    assert Rollout(client, {"id": session_id}).status().status == "cancelled"
    with client.session(example="random", seed=7, steps=3) as s:  # same seed, same frames
        again = s.step(actions)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    with client.session(example="random", seed=8, steps=3) as s:
        assert not np.array_equal(s.step(actions)[-1], first[-1])
    # chunk_size 1: a session equals a rollout given every action up front.
    r = client.rollout(example="random", seed=7, steps=3, chunk_size=1, actions=actions)
    assert all(np.array_equal(a, b) for a, b in zip(r.frames(), first, strict=True))


def test_session_errors_and_endings(client: Client, server: Server) -> None:
    with pytest.raises(BadRequest) as e:
        client.session(example="random", sampler="nope")
    assert e.value.field == "sampler" and "ddim" in e.value.accepted
    with client.session(example="random") as s:
        with pytest.raises(BadRequest) as e:
            s.step("jump")
        assert e.value.field == "actions" and e.value.accepted == s.actions
        assert s.step("left").shape == (16, 16, 3)  # the session goes on
    # A disconnect frees the batch slot at once (max_batch is 1: the rollout runs).
    s = client.session(example="random")
    s.step("up")
    s.ws.close()
    job = Rollout(client, {"id": s.id})
    deadline = time.monotonic() + 10
    while job.status().status != "cancelled":
        assert time.monotonic() < deadline, job.last
        time.sleep(0.1)
    assert client.rollout(example="random", frames=2).wait(60).status == "succeeded"
    # An idle session ends by itself (DFSERVE_SESSION_IDLE_S=6 on the test server): wait for
    # the server to end it, not for a fixed time.
    s = client.session(example="random")
    s.step("up")
    job = Rollout(client, {"id": s.id})
    deadline = time.monotonic() + 60
    while job.status().status != "cancelled":
        assert time.monotonic() < deadline, job.last
        time.sleep(0.1)
    with pytest.raises(SessionEnded) as ended:
        s.step("up")
    assert ended.value.body["status"] == "cancelled" and "idle" in str(ended.value)
    s.ws.close()


def test_error_mapping(client: Client) -> None:
    with pytest.raises(BadRequest) as e:
        client.rollout(example="random", sampler="nope")
    assert (e.value.status, e.value.field) == (422, "sampler")
    assert e.value.accepted == ["ddim", "ddpm", "dpmpp_2m"]
    with pytest.raises(BadRequest) as e:
        client.rollout(example="nope")
    assert e.value.field == "example" and e.value.accepted == ["random"]
    with pytest.raises(NotFound) as nf:
        client.get("0123456789abcdef")
    assert nf.value.field == "id"
    with pytest.raises(NotFound):
        list(Rollout(client, {"id": "0123456789abcdef"}).frames())
    with pytest.raises(NotFound):
        client.model("nope")


def test_retry_on_429_honours_retry_after(client: Client, server: Server) -> None:
    """max_batch 1, max_queued 1: a running job and a queued one fill the queue."""
    running = client.rollout(example="random", frames=500, seed=5, steps=8)
    stream = running.frames()
    next(stream)  # it runs
    stream.close()
    queued = client.rollout(example="random", frames=2)
    assert queued.status().status == "queued"
    with Client(server.url, retries=0) as impatient, pytest.raises(QueueFull) as full:
        impatient.rollout(example="random", frames=2)
    # the soonest finish of the running job at its pace so far, within the server's bounds
    # (tests/server/test_queue.py checks the estimate itself)
    assert full.value.status == 429 and full.value.retry_after in range(1, 601)

    slept: list[float] = []

    def sleep(seconds: float) -> None:  # the queue drains while the client waits
        slept.append(seconds)
        queued.cancel()

    with Client(server.url, retries=3, backoff=0.1, sleep=sleep) as patient:
        third = patient.rollout(example="random", frames=2)
        assert len(slept) == 1 and slept[0] >= 1  # Retry-After (>= 1 s) beats the 0.1 s backoff
        running.cancel()
        assert third.wait(60).status == "succeeded"


def test_backoff_auth_and_server_errors_with_a_fake_transport() -> None:
    answers = [httpx.Response(503), httpx.Response(503),
               httpx.Response(202, json={"id": "abc", "status": "queued", "notes": []})]
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers.pop(0)

    slept: list[float] = []
    with Client("http://fake", api_key="k1", backoff=0.5, transport=httpx.MockTransport(handler),
                sleep=slept.append) as c:
        assert c.rollout(example="x").id == "abc"
    assert slept == [0.5, 1.0]  # exponential, no Retry-After
    assert {r.headers["authorization"] for r in seen} == {"Bearer k1"}
    keys = {r.headers["idempotency-key"] for r in seen}
    assert len(keys) == 1  # one key for all attempts: a retried submit never runs twice
    assert json.loads(seen[0].content) == {"example": "x"}

    def status(code: int) -> httpx.MockTransport:
        return httpx.MockTransport(lambda r: httpx.Response(
            code, json={"detail": {"field": None, "message": "no"}}))

    for code, cls in ((401, Unauthorized), (403, Forbidden), (500, ServerError),
                      (413, BadRequest)):
        with Client("http://fake", retries=0, transport=status(code)) as c, \
                pytest.raises(cls) as e:
            c.models()
        assert e.value.status == code


def test_status_is_a_frozen_dataclass_on_both_clients() -> None:
    doc = {"id": "abc", "status": "running", "progress": {"frames_done": 2, "frames_total": 8},
           "queue_position": None, "created_at": 1.0, "started_at": 2.0, "finished_at": None,
           "error": None, "worker": "w1", "params": {"seed": 3}, "notes": ["n"],
           "links": {"self": "/v1/rollouts/abc"}, "a_field_of_a_newer_server": 1}

    def transport() -> httpx.MockTransport:
        return httpx.MockTransport(lambda request: httpx.Response(200, json=doc))

    with Client("http://fake", transport=transport()) as c:
        status = c.get("abc").status()
    assert isinstance(status, RolloutStatus) and not status.finished
    assert status.progress == Progress(2, 8) and status.notes == ("n",)
    assert status.params == {"seed": 3} and status.worker == "w1"
    with pytest.raises(AttributeError):
        status.status = "cancelled"  # type: ignore[misc]

    async def async_status() -> RolloutStatus:
        async with AsyncClient("http://fake", transport=transport()) as c:
            return await (await c.get("abc")).status()

    assert asyncio.run(async_status()) == status


def test_async_client(server: Server) -> None:
    async def main() -> None:
        async with AsyncClient(server.url) as c:
            assert sorted(m["id"] for m in await c.models()) == SERVED_MODELS
            r = await c.rollout(example="random", frames=5, seed=9)
            frames = [f async for f in r.frames()]
            assert len(frames) == 5 and np.array_equal(frames[2], await r.frame(2))
            assert len(video.decode_video(await r.video())) == 5
            with pytest.raises(BadRequest):
                await c.rollout(example="random", sampler="nope")
            async with c.session(example="random", seed=7, steps=3) as s:  # no `await`
                got = await s.step(["left", "up"])
                assert len(got) == 2 and s.frames_received == 2 and s.id
            # Awaited, it opens the same session; the same seed gives the same frames.
            s = await c.session(example="random", seed=7, steps=3)
            try:
                again = await s.step(["left", "up"])
                assert all(np.array_equal(a, b) for a, b in zip(got, again, strict=True))
            finally:
                done = await s.close()
            assert done is not None and done["type"] == "done"

    asyncio.run(main())


def test_rollout_cli_through_the_server(server: Server, tmp_path: Path) -> None:
    """`dfserve rollout --url`: the same flags as --local, -o out.mp4 or -o DIR/."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DFSERVE_TORCH_THREADS": "1"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(DFSERVE), "rollout", "--url", server.url, *args],
                              capture_output=True, text=True, timeout=120, env=env)

    out = tmp_path / "out.mp4"
    run = cli("--example", "random", "--frames", "6", "--steps", "2", "--seed", "4",
              "--actions", "left,up", "-o", str(out))
    assert run.returncode == 0, run.stderr
    assert len(video.decode_video(out.read_bytes())) == 6
    run = cli("--context", str(tmp_path / "a.png"), "-o", str(out))  # a missing file
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.splitlines() == [f"dfserve rollout: error: context: {tmp_path / 'a.png'}: "
                                       "no such file"], run.stderr
    for suffix, codec in ((".gif", "gif"), (".webm", "vp9")):  # encoded from the stream
        other = tmp_path / f"out{suffix}"
        run = cli("--example", "random", "--frames", "4", "--steps", "2", "-o", str(other))
        assert run.returncode == 0, run.stderr
        with av.open(io.BytesIO(other.read_bytes())) as container:
            assert container.streams.video[0].codec_context.name == codec
        decoded = video.decode_video(other.read_bytes())
        assert len(decoded) == 4 and decoded[0].shape == (16, 16, 3)
    folder = tmp_path / "frames"
    pngs = [video.encode_png(np.full((16, 16, 3), v, np.uint8)) for v in (10, 200)]
    for i, png in enumerate(pngs):
        (tmp_path / f"c{i}.png").write_bytes(png)
    run = cli("--context", str(tmp_path / "c0.png"), str(tmp_path / "c1.png"), "--frames", "3",
              "--seed", "1", "-o", f"{folder}/")
    assert run.returncode == 0, run.stderr
    job_id = run.stdout.strip().rsplit("rollout ", 1)[1].rstrip(")")
    assert sorted(p.name for p in folder.iterdir()) == ["000.png", "001.png", "002.png"]
    for i in range(3):  # the server's exact PNGs
        stored = httpx.get(f"{server.url}/v1/rollouts/{job_id}/frames/{i}").content
        assert (folder / f"{i:03d}.png").read_bytes() == stored
    run = cli("--example", "nope", "-o", str(out))  # the server's 422: one line, code 2
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    (line,) = run.stderr.splitlines()
    assert line.startswith("dfserve rollout: error: 422 example:") and "random" in line
