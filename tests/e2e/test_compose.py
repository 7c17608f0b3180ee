"""The docker-compose topology, run as plain processes: Redis (AOF) + API + two workers.

There is no Docker engine on the test machines, so this test reads docker-compose.yml merged
with docker/compose.cpu.yml (tests.deploy.load_compose, the compose merge and interpolation
rules) and starts each service's own `command` with its own `environment`, changed only
where a container differs from a process on this machine:

- `redis:6379` -> 127.0.0.1:<free port>; the api's port 8000 -> a free port, bound to
  127.0.0.1 instead of 0.0.0.0; `dfserve`/`python` -> this venv's;
- a named volume's mount point -> a folder here: /data (Redis's working dir in its image, so
  `--dir`) -> tmp, /models -> the folder holding the tiny test bundle;
- required variables get test values: DFSERVE_API_KEYS, and DFSERVE_MODEL = the tiny
  bundle's id (found in /models, as docs/deployment.md tells users to mount their own);
- healthchecks are each service's own `healthcheck.test` (docker/healthcheck.py), started in
  depends_on order as compose does, with `--pid` since both workers share this host.

Then it serves rollouts over HTTP and WebSocket, and sends one worker SIGTERM mid-rollout: the
worker hands the job back and exits 0, the other worker finishes it, and the client gets one
complete video: every frame index exactly once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import av
import httpx
import pytest
from PIL import Image
from websockets.sync.client import connect as ws_connect

from dfserve.model.bundle import find_bundles, load_config
from tests.deploy import COMPOSE, CPU_OVERRIDE, HEALTHCHECK, IMAGE_HEALTHCHECK, load_compose
from tests.deploy.test_deploy_files import seconds

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
API_KEY = "e2e-test-key"
LONG_FRAMES = 120  # long enough that SIGTERM lands mid-rollout (a few s on 2 CPU cores)
LONG_STEPS = 16
START_TIMEOUT_S = 180  # torch import + warm-up of two workers on 2 busy cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str]
    healthcheck: list[str] = field(default_factory=list)
    stopping: bool = False  # stopped on purpose: its exit is no failure

    @property
    def worker_name(self) -> str:
        return f"{socket.gethostname()}:{self.proc.pid}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def healthy(self) -> bool:
        result = subprocess.run(self.healthcheck, env=self.env, capture_output=True, timeout=30)
        return result.returncode == 0


@dataclass
class Topology:
    compose: dict[str, Any]
    url: str
    redis_port: int
    redis_dir: Path
    services: dict[str, Service] = field(default_factory=dict)

    @property
    def workers(self) -> list[Service]:
        return [s for n, s in self.services.items() if n.startswith("worker")]

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30,
                            headers={"Authorization": f"Bearer {API_KEY}"})  # fmt: skip

    def logs(self) -> str:
        return "\n".join(f"----- {n}\n{s.output()[-4000:]}" for n, s in self.services.items())


class Localizer:
    """Turns a container's command/environment into this machine's."""

    def __init__(self, redis_port: int, api_port: int, volumes: dict[str, Path],
                 compose: dict[str, Any]) -> None:
        self.redis_port, self.api_port = redis_port, api_port
        self.mounts: dict[str, Path] = {}  # container path -> local folder
        for service in compose["services"].values():
            for spec in service.get("volumes", []):
                source, target = spec.split(":")[:2]
                assert source in volumes, f"volume {source!r}: the test has no folder for it"
                self.mounts[target] = volumes[source]

    def value(self, text: str) -> str:
        text = text.replace("redis://redis:6379", f"redis://127.0.0.1:{self.redis_port}")
        for target, local in self.mounts.items():
            if text == target or text.startswith(target + "/"):
                text = str(local) + text[len(target):]
        return text

    def command(self, argv: list[str]) -> list[str]:
        out = [self.value(a) for a in argv]
        if out[0] == "dfserve":
            out[0] = str(BIN / "dfserve")
        if "--port" in out:
            out[out.index("--port") + 1] = str(self.api_port)
        if "--host" in out:
            out[out.index("--host") + 1] = "127.0.0.1"  # never listen beyond loopback here
        return out

    def environment(self, service: dict[str, Any]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DFSERVE_")}
        env.update({k: self.value(str(v)) for k, v in service.get("environment", {}).items()})
        env["PYTHONUNBUFFERED"] = "1"  # as the image's ENV
        # Not a topology change: keeps two workers + the API from oversubscribing 2 cores.
        env["OMP_NUM_THREADS"] = "1"
        return env

    def healthcheck(self, test: list[str], pid: int) -> list[str]:
        assert test[0] == "CMD", test
        argv = test[1:]
        if argv[0] == "redis-cli":
            return ["redis-cli", "-p", str(self.redis_port), *argv[1:]]
        assert argv[:2] == ["python", IMAGE_HEALTHCHECK], argv
        return [sys.executable, str(HEALTHCHECK), *argv[2:], "--pid", str(pid)]


def wait_for(what: str, check: Any, timeout: float, topology: Topology | None = None,
             interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        for s in (topology.services.values() if topology else []):
            alive = s.stopping or s.proc.poll() is None
            assert alive, f"{s.name} exited: {s.proc.returncode}\n{s.output()}"
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n"
                         + (topology.logs() if topology else ""))  # fmt: skip


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory, tiny_bundle_dir: Path
             ) -> Iterator[Topology]:  # fmt: skip
    redis_server = shutil.which("redis-server")
    assert redis_server and shutil.which("redis-cli"), (
        "redis-server/redis-cli are required for this test (Debian: apt-get install "
        "redis-server); it never skips")  # fmt: skip

    tiny = load_config(tiny_bundle_dir).name
    assert tiny not in find_bundles([]), f"a packaged bundle is also named {tiny!r}"
    tmp = tmp_path_factory.mktemp("compose")
    compose = load_compose(COMPOSE, CPU_OVERRIDE,
                           env={"DFSERVE_API_KEYS": API_KEY, "DFSERVE_MODEL": tiny})
    assert set(compose["volumes"]) == {"redis-data", "models"}
    (tmp / "redis-data").mkdir()
    api_port = free_port()
    local = Localizer(free_port(), api_port, {"redis-data": tmp / "redis-data",
                                              "models": tiny_bundle_dir.parent}, compose)
    top = Topology(compose, f"http://127.0.0.1:{api_port}", local.redis_port, tmp / "redis-data")
    spec = compose["services"]
    assert set(spec) == {"redis", "api", "worker"}

    def start(name: str, service: str, argv: list[str]) -> Service:
        log = tmp / f"{name}.log"
        env = local.environment(spec[service])
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=tmp)  # fmt: skip
        s = Service(name, proc, log, env)
        s.healthcheck = local.healthcheck(spec[service]["healthcheck"]["test"], proc.pid)
        top.services[name] = s
        return s

    try:
        # redis: the image runs in /data (the redis-data volume), hence --dir.
        argv = [*spec["redis"]["command"], "--port", str(local.redis_port),
                "--bind", "127.0.0.1", "--dir", str(top.redis_dir)]  # fmt: skip
        assert argv[0] == "redis-server"
        redis = start("redis", "redis", [redis_server, *argv[1:]])
        wait_for("redis healthy", redis.healthy, 30, top)

        # api and workers: depends_on redis service_healthy, then their own healthchecks.
        assert spec["api"]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert spec["worker"]["depends_on"]["redis"]["condition"] == "service_healthy"
        api = start("api", "api", local.command(spec["api"]["command"]))
        workers = [start(f"worker-{i}", "worker", local.command(spec["worker"]["command"]))
                   for i in (1, 2)]  # `docker compose up --scale worker=2`
        for s in (api, *workers):
            wait_for(f"{s.name} healthy", s.healthy, START_TIMEOUT_S, top, interval=1)
        yield top
    finally:
        stop_all(top)


def stop_all(top: Topology) -> dict[str, int]:
    """`docker compose down`: SIGTERM, the service's stop_grace_period (compose's default
    10s), then SIGKILL; dependents first. The exit codes, -9 for a kill."""
    codes = {}
    for s in reversed(list(top.services.values())):
        if s.proc.poll() is None:
            service = top.compose["services"][s.name.split("-")[0]]
            s.stopping = True
            s.proc.send_signal(signal.SIGTERM)
            try:
                s.proc.wait(timeout=seconds(service.get("stop_grace_period", "10s")))
            except subprocess.TimeoutExpired:
                s.proc.kill()
                s.proc.wait(timeout=10)
        codes[s.name] = s.proc.returncode
    return codes


def submit(client: httpx.Client, **params: Any) -> str:
    r = client.post("/v1/rollouts", json=params)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def status(client: httpx.Client, job_id: str) -> dict[str, Any]:
    r = client.get(f"/v1/rollouts/{job_id}")
    assert r.status_code == 200, r.text
    return dict(r.json())


def finished(client: httpx.Client, job_id: str, top: Topology, timeout: float) -> dict[str, Any]:
    doc = wait_for(f"rollout {job_id}", lambda: (s := status(client, job_id))["status"] not in
                   ("queued", "running") and s, timeout, top)  # fmt: skip
    assert doc["status"] == "succeeded", (doc, top.logs())
    return dict(doc)


def video_frames(client: httpx.Client, job_id: str) -> int:
    r = client.get(f"/v1/rollouts/{job_id}/video")
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4", r.text[:200]
    with av.open(BytesIO(r.content), mode="r") as container:
        frames = list(container.decode(video=0))
    assert {(f.width, f.height) for f in frames} == {(16, 16)}
    return len(frames)


def streamed_indices(top: Topology, job_id: str) -> list[int]:
    """Every frame index of the job's WebSocket stream, in order, until `done`."""
    url = top.url.replace("http://", "ws://") + f"/v1/rollouts/{job_id}/stream?format=png"
    indices: list[int] = []
    with ws_connect(url, additional_headers={"Authorization": f"Bearer {API_KEY}"},
                    open_timeout=10, close_timeout=5) as ws:  # fmt: skip
        while True:
            msg = json.loads(ws.recv(timeout=60))
            if msg["type"] == "frame":
                png = ws.recv(timeout=10)
                assert isinstance(png, bytes)
                assert Image.open(BytesIO(png)).size == (16, 16)
                indices.append(int(msg["index"]))
            elif msg["type"] == "done":
                assert msg["status"] == "succeeded", msg
                return indices


def test_topology_is_ready_with_two_warm_workers(topology: Topology) -> None:
    with topology.client() as client:
        assert client.get("/healthz").status_code == 200
        r = client.get("/readyz")
        assert r.status_code == 200, r.text
        ready = r.json()
        assert ready["ready"] and ready["redis"]
        names = {w["name"] for w in ready["workers"] if w["warmed_up"]}
        assert names == {w.worker_name for w in topology.workers}
        assert {w["device"] for w in ready["workers"]} == {"cpu"}  # compose.cpu.yml's --device
        models = client.get("/v1/models").json()
        assert models["default"] == "tiny", models  # DFSERVE_MODEL, found in /models


def test_the_image_healthcheck_finds_the_role_by_itself(topology: Topology) -> None:
    """The Dockerfile's HEALTHCHECK passes no role: the script reads it from the command."""
    for s in (topology.services["api"], *topology.workers):
        argv = [sys.executable, str(HEALTHCHECK), "--pid", str(s.proc.pid)]
        r = subprocess.run(argv, env=s.env, capture_output=True, text=True, timeout=30)
        role = "api" if s.name == "api" else "worker"
        assert r.returncode == 0 and f"healthy: {role}" in r.stdout, (s.name, r)
    api = topology.services["api"]
    wrong = [sys.executable, str(HEALTHCHECK), "worker", "--pid", str(api.proc.pid)]
    r = subprocess.run(wrong, env=api.env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "no dfserve worker process" in r.stderr, r


def test_serves_a_rollout_over_http(topology: Topology) -> None:
    with topology.client() as client:
        job = submit(client, example="random", frames=6, seed=1)
        doc = finished(client, job, topology, 120)
        assert doc["progress"] == {"frames_done": 6, "frames_total": 6}
        assert doc["worker"] in {w.worker_name for w in topology.workers}
        assert video_frames(client, job) == 6
        r = client.get(f"/v1/rollouts/{job}/frames/5")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert streamed_indices(topology, job) == list(range(6))


def test_sigterm_mid_rollout_hands_the_job_to_the_other_worker(topology: Topology) -> None:
    grace = seconds(topology.compose["services"]["worker"]["stop_grace_period"])
    assert topology.compose["services"]["worker"]["stop_signal"] == "SIGTERM"
    by_name = {w.worker_name: w for w in topology.workers}
    n = LONG_FRAMES
    with topology.client() as client:
        job = submit(client, example="random", frames=n, steps=LONG_STEPS, seed=7)
        # Wait until a worker is a few frames into it, then stop that worker as compose does.
        doc = wait_for("the long rollout to be under way", lambda: (
            s := status(client, job))["status"] == "running" and
            s["progress"]["frames_done"] >= 3 and s, 120, topology, interval=0.05)  # fmt: skip
        victim, survivor = by_name[doc["worker"]], next(
            w for name, w in by_name.items() if name != doc["worker"])
        done_at_sigterm = doc["progress"]["frames_done"]
        victim.stopping = True
        victim.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        rc = victim.proc.wait(timeout=grace)  # within stop_grace_period: no SIGKILL
        stopped_in = time.monotonic() - t0
        assert rc == 0, victim.output()
        assert re.search(r"releasing 1 live job", victim.output()), victim.output()[-3000:]
        assert done_at_sigterm < n

        doc = finished(client, job, topology, 300)
        assert doc["worker"] == survivor.worker_name, doc
        assert any(f"released by {victim.worker_name}" in note for note in doc["notes"]), doc
        assert doc["progress"] == {"frames_done": n, "frames_total": n}
        assert video_frames(client, job) == n  # one complete video
        for i in (0, n // 2, n - 1):
            r = client.get(f"/v1/rollouts/{job}/frames/{i}")
            assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert client.get(f"/v1/rollouts/{job}/frames/{n}").status_code == 404
        # the survivor is still the only ready worker
        ready = client.get("/readyz").json()
        assert [w["name"] for w in ready["workers"]] == [survivor.worker_name]
    # every frame index exactly once in the event stream, despite the hand-over
    assert streamed_indices(topology, job) == list(range(n))
    print(f"SIGTERM at frame {done_at_sigterm}/{n}: the worker stopped in {stopped_in:.2f}s "
          f"(grace {grace:.0f}s); the other one ran it in "
          f"{doc['finished_at'] - doc['started_at']:.1f}s")


def test_redis_keeps_an_append_only_file(topology: Topology) -> None:
    aof = list(topology.redis_dir.glob("appendonlydir/*.aof"))
    assert aof and sum(p.stat().st_size for p in aof) > 0, list(topology.redis_dir.iterdir())
    r = subprocess.run(["redis-cli", "-p", str(topology.redis_port), "config", "get",
                        "appendonly"], capture_output=True, text=True, timeout=10)  # fmt: skip
    assert r.stdout.split() == ["appendonly", "yes"], r.stdout


def test_compose_down_stops_every_service_gracefully(topology: Topology) -> None:
    codes = stop_all(topology)
    assert set(codes) == {"redis", "api", "worker-1", "worker-2"}
    assert all(code == 0 for code in codes.values()), (codes, topology.logs())
