"""`dfserve serve` (API + worker thread + embedded queue, one process) and `dfserve api`.

Embedded mode (no DFSERVE_REDIS_URL): one fakeredis FakeServer, with separate clients for the
API and the worker thread, runs the very same queue code as production Redis. With a URL,
`serve` runs the API and one worker thread against that Redis (more workers may join).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import uvicorn

from dfserve.server.app import create_app
from dfserve.server.queue import Queue
from dfserve.server.settings import Settings
from dfserve.server.worker import build_worker

log = logging.getLogger(__name__)

# Frames go out as PNG/JPEG, already compressed: per-message deflate would spend the API's CPU
# (and the GIL the embedded worker needs) compressing them again for nothing.
WS_DEFLATE = False
# On SIGTERM uvicorn stops accepting, then waits this long for open requests (a ?wait=true
# POST may wait minutes, a stream for ever) before cancelling them: compose gives 30 s.
GRACEFUL_SHUTDOWN_S = 5


def embedded_torch_threads(settings: Settings) -> int | None:
    """Torch threads for the worker inside `dfserve serve`: on a CPU, one core fewer than the
    machine has, so the API thread in the same process is not fighting the model's threads
    for cores (on 2 cores, 1 thread streams faster than 2). DFSERVE_TORCH_THREADS wins."""
    if settings.torch_threads or settings.resolved_device() != "cpu":
        return settings.torch_threads
    return max(1, (os.cpu_count() or 1) - 1)


def run_serve(settings: Settings, host: str, port: int) -> None:
    settings = settings.model_copy(update={"torch_threads": embedded_torch_threads(settings)})
    fake_server = None
    if settings.redis_url is None:
        import fakeredis

        fake_server = fakeredis.FakeServer()
        log.info("no DFSERVE_REDIS_URL: using the embedded in-process queue")
    api_queue = Queue(settings.redis_client(fake_server), **settings.queue_options())
    worker_queue = Queue(settings.redis_client(fake_server), **settings.queue_options())
    app = create_app(settings, api_queue)  # resolves the model first: fails before any thread
    stop = threading.Event()
    failed: list[BaseException] = []
    # Load the weights before serving: a malformed bundle ends `serve` at once with one line
    # (ValueError naming the bundle, printed by the CLI), not after the API came up.
    worker = build_worker(settings, worker_queue, stop)

    def work() -> None:
        try:
            worker.run()
        except BaseException as e:  # a worker that cannot start makes the server useless
            failed.append(e)
            log.exception("the worker thread died")
            server.should_exit = True

    config = uvicorn.Config(app, host=host, port=port, log_config=None,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                            ws_per_message_deflate=WS_DEFLATE)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=work, name="dfserve-worker", daemon=True)
    thread.start()
    _exit_quietly_on_signals()
    try:
        server.run()
    finally:
        stop.set()  # uvicorn handled SIGINT/SIGTERM: the worker releases its jobs and ends
        thread.join(timeout=30)
    if failed:
        raise RuntimeError(f"the worker failed: {failed[0]}") from failed[0]


def run_api(settings: Settings, host: str, port: int) -> None:
    if not settings.redis_url:
        raise ValueError("redis_url: `dfserve api` needs DFSERVE_REDIS_URL (a Redis shared with "
                         "the workers); `dfserve serve` runs everything in one process")
    app = create_app(settings)
    _exit_quietly_on_signals()
    uvicorn.run(app, host=host, port=port, log_config=None, ws_per_message_deflate=WS_DEFLATE,
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)


def _exit_quietly_on_signals() -> None:
    """uvicorn handles SIGTERM/SIGINT itself (graceful shutdown), then re-raises the signal to
    the handlers that were there before it started. Make those no-ops, so that after the
    shutdown the process goes on to stop its worker and exits 0 instead of dying by signal."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
