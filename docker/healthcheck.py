"""Container healthcheck for both roles of the dfserve image (exit 0 healthy, 1 not).

    python /opt/dfserve/healthcheck.py [api|worker] [--pid PID]

- api (also `dfserve serve`): GET /healthz on the address the process listens on (its
  `--host`/`--port`, default 8000) answers 200. Liveness only, on purpose: /readyz is 503
  while no worker is warm, which is the queue's state, not this container's health; a
  load balancer or a Kubernetes readinessProbe asks /readyz instead.
- worker: every `dfserve worker` process here has a fresh heartbeat in Redis (host = this
  hostname, pid = its pid) that says its model is warmed up. The heartbeat is renewed by the
  worker loop itself, so a hung loop or a lost Redis turns the container unhealthy.

With no role, the role is read from the running dfserve command (`dfserve api ...`,
`dfserve worker ...`), so the image's HEALTHCHECK fits whatever command the container runs.
--pid restricts the check to one process (used by tests that run several on one host).
The worker check reads DFSERVE_REDIS_URL and DFSERVE_REDIS_PREFIX, as the worker does, and
asks server.queue (all Redis knowledge lives there); it does not import torch.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import urllib.request
from pathlib import Path

ROLES = ("api", "serve", "worker")


def dfserve_processes() -> list[tuple[int, str, list[str]]]:
    """(pid, role, argv) of every `dfserve <role>` process visible in /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes()
                    .split(b"\0") if a]  # fmt: skip
        except OSError:  # gone meanwhile, or not ours to read
            continue
        # `dfserve ROLE` exec'd directly or through its script's python shebang; not a
        # wrapper that merely mentions it (docker-init -- dfserve worker, sh -c ...).
        i = 1 if argv and os.path.basename(argv[0]).startswith("python") else 0
        if len(argv) > i + 1 and os.path.basename(argv[i]) == "dfserve" and argv[i + 1] in ROLES:
            found.append((int(entry.name), argv[i + 1], argv[i + 2:]))
    return found


def flag(argv: list[str], name: str, default: str) -> str:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return default


def check_api(argv: list[str]) -> str | None:
    host = flag(argv, "--host", "127.0.0.1")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    host = f"[{host}]" if ":" in host else host
    url = f"http://{host}:{flag(argv, '--port', '8000')}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return None if response.status == 200 else f"{url} answered {response.status}"
    except OSError as e:
        return f"{url}: {e}"


def check_workers(pids: list[int]) -> str | None:
    url = os.environ.get("DFSERVE_REDIS_URL")
    if not url:
        return "DFSERVE_REDIS_URL is not set"
    from dfserve.server.queue import Queue, connect  # no torch: this runs every few seconds

    client = connect(url)
    try:
        queue = Queue(client, prefix=os.environ.get("DFSERVE_REDIS_PREFIX", "dfserve"))
        if not queue.ping():
            return f"Redis at {url} is unreachable"
        host = socket.gethostname()
        beats = {w.get("pid"): w for w in queue.workers() if w.get("host") == host}
    finally:
        client.close()
    for pid in pids:
        beat = beats.get(pid)
        if beat is None:
            return f"worker pid {pid}: no fresh heartbeat from {host}"
        if not beat.get("warmed_up"):
            return f"worker pid {pid}: the model is not warmed up yet"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", nargs="?", choices=["api", "worker"])
    parser.add_argument("--pid", type=int, help="check this dfserve process only")
    args = parser.parse_args(argv)

    procs = [p for p in dfserve_processes() if args.pid is None or p[0] == args.pid]
    role = args.role or next(("worker" if r == "worker" else "api" for _, r, _ in procs), None)
    if role is None:
        print("unhealthy: no dfserve api/serve/worker process is running", file=sys.stderr)
        return 1
    mine = [p for p in procs if (p[1] == "worker") == (role == "worker")]
    if not mine:
        print(f"unhealthy: no dfserve {role} process is running", file=sys.stderr)
        return 1
    if role == "worker":
        problem = check_workers([pid for pid, _, _ in mine])
    else:
        problem = next((e for _, _, a in mine if (e := check_api(a))), None)
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    print(f"healthy: {role} ({len(mine)} process{'es' if len(mine) > 1 else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
