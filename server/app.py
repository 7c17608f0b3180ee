"""The FastAPI application: `create_app(settings, queue=None)`.

The lifespan owns the Redis client and the Queue (unless a queue is handed in, as the embedded
mode and the tests do). The API process reads bundle configs only: it never loads weights or
builds the network; a request is checked by model.request.resolve into the job's JobSpec
(server/jobs.py), which the worker runs as it is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio.to_thread
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dfserve.server.auth import AuthMiddleware
from dfserve.server.catalog import Catalog
from dfserve.server.docs import add_offline_docs
from dfserve.server.errors import ApiError, BodyTooLarge, add_error_handlers
from dfserve.server.metrics import Metrics
from dfserve.server.queue import Queue
from dfserve.server.routes import health, models, rollouts, sessions
from dfserve.server.settings import Settings
from dfserve.server.streams import EventHub

log = logging.getLogger(__name__)

VIEWER = Path(__file__).resolve().parent.parent / "clients" / "web"
THREADS = 200  # sync routes and the Redis reads of WebSockets and ?wait=true share these


class EdgeMiddleware:
    """Refuses bodies over max_body_bytes (413, by Content-Length or while streaming) and
    records request latency by route template."""

    def __init__(self, app: ASGIApp, limit: int, metrics: Metrics) -> None:
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500
        length = dict(scope["headers"]).get(b"content-length")
        if length and length.isdigit() and int(length) > self.limit:
            await _json(send, 413, ApiError(413, None, str(BodyTooLarge(self.limit))).body())
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge(self.limit)
            return message

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, limited_receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe(scope["method"], route, status, started)


async def _json(send: Send, status: int, body: dict[str, Any]) -> None:
    response = JSONResponse(body, status_code=status)
    await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def create_app(settings: Settings, queue: Queue | None = None) -> FastAPI:
    catalog = Catalog.from_settings(settings)  # fails loudly at startup when no model is found

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = None
        if app.state.queue is None:
            if settings.redis_url is None:
                log.warning("no DFSERVE_REDIS_URL: the API uses a private in-process queue "
                            "that no worker can reach")  # fmt: skip
            client = settings.redis_client()
            app.state.queue = Queue(client, **settings.queue_options())
        anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
        app.state.hub = EventHub(app.state.queue)  # every stream's wait for news
        app.state.hub.start()
        log.info("API ready: models %s (default %s)", sorted(catalog.configs), catalog.default)
        try:
            yield
        finally:
            app.state.hub.stop()
            if client is not None:
                client.close()
            if queue is None:
                app.state.queue = None

    app = FastAPI(title="dfserve", version="0.1.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None,  # server/docs.py: offline ones
                  description="Diffusion-forcing video world models: queued rollouts, "
                              "streamed frames, MP4s.")  # fmt: skip
    app.state.settings, app.state.catalog, app.state.queue = settings, catalog, queue
    app.state.metrics = Metrics(lambda: app.state.queue)
    for module in (models, rollouts, sessions, health):
        app.include_router(module.router)
    add_error_handlers(app)
    # Order (outermost first): Edge (413, metrics) -> CORS (preflights, headers on 401/429
    # too) -> Auth (keys, rate limit on /v1) -> the routes.
    app.add_middleware(AuthMiddleware, api_keys=settings.api_keys,
                       rate_limit_per_min=settings.rate_limit_per_min)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["*"], allow_headers=["*"],
                           expose_headers=["Location", "Retry-After", "X-Rollout-Id"])
    app.add_middleware(EdgeMiddleware, limit=settings.max_body_bytes,
                       metrics=app.state.metrics)
    add_offline_docs(app)
    _mount_viewer(app)
    return app


def _mount_viewer(app: FastAPI) -> None:
    """The web viewer at / when clients/web has been built; otherwise / leads to the docs."""
    if (VIEWER / "index.html").is_file():
        app.mount("/", StaticFiles(directory=VIEWER, html=True), name="viewer")
        return

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/docs")
