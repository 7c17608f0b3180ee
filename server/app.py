"""The FastAPI application: `create_app(settings, queue=None)`.

The lifespan owns the Redis client and the Queue (unless a queue is handed in, as the embedded
mode and the tests do). The API process reads bundle configs only: it never loads weights or
builds the network; validation uses model.request.prepare, the same code the worker runs.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio.to_thread
import redis
from fastapi import FastAPI, Request, WebSocket
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.auth import AuthMiddleware
from server.docs import add_offline_docs
from server.metrics import Metrics
from server.queue import Queue
from server.routes import health, models, rollouts, sessions
from server.routes.deps import ApiError, Catalog, value_error
from server.settings import Settings
from server.streams import EventHub

log = logging.getLogger(__name__)

VIEWER = Path(__file__).resolve().parent.parent / "clients" / "web"
REDIS_RETRY_AFTER_S = 2  # Retry-After of the 503 answered while Redis is unreachable
THREADS = 200  # sync routes and the Redis reads of WebSockets and ?wait=true share these


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body exceeds {limit} bytes")
        self.limit = limit


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
    _add_error_handlers(app)
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


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ValueError)
    async def bad_value(request: Request, e: ValueError) -> JSONResponse:
        err = value_error(e)  # a ValueError that escaped a route is still the client's input
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        err = rollouts.validation_error(e.errors())
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def redis_down(conn: HTTPConnection, e: redis.RedisError) -> JSONResponse | None:
        # Redis down, restarting or still loading its AOF: the client should retry, and this
        # is no bug of ours (never a 500). Workers and the API reconnect by themselves.
        log.warning("Redis unavailable: %s", e)
        if isinstance(conn, WebSocket):  # close it: 1013 "try again later"
            with contextlib.suppress(Exception):
                await conn.close(1013)
            return None
        err = ApiError(503, None, "the job queue (Redis) is unavailable; retry shortly",
                       headers={"Retry-After": str(REDIS_RETRY_AFTER_S)})
        return JSONResponse(err.body(), status_code=503, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        if e.status_code != 405:
            return await http_exception_handler(request, e)
        # Starlette's 405 names the methods of the first route whose path matched (GET, HEAD
        # for /v1/rollouts, which POST serves too): name those of every route of the path.
        allow = ", ".join(_allowed_methods(request))
        if request.method == "OPTIONS":
            return Response(status_code=204, headers={"Allow": allow})
        err = ApiError(405, None, f"{request.method} is not allowed here; use {allow}")
        return JSONResponse(err.body(), status_code=405, headers={"Allow": allow})

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, e: BodyTooLarge) -> JSONResponse:
        return JSONResponse(ApiError(413, None, str(e)).body(), status_code=413)


def _allowed_methods(request: Request) -> list[str]:
    """The methods of the request's path, as the OpenAPI document lists them (GET and HEAD
    alone where no API route matches: the viewer's files)."""
    methods: set[str] = set()
    for template, item in request.app.openapi()["paths"].items():
        if _template_regex(template).fullmatch(request.url.path):
            methods |= {m.upper() for m in item if m != "parameters"}
    if not methods or "GET" in methods:
        methods |= {"GET", "HEAD"}
    return sorted(methods | {"OPTIONS"})


def _template_regex(template: str) -> re.Pattern[str]:
    """/v1/rollouts/{rollout_id} -> a regex matching one path segment per parameter."""
    parts = re.split(r"(\{[^/}]+\})", template)
    return re.compile("".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts))


def _mount_viewer(app: FastAPI) -> None:
    """The web viewer at / when clients/web has been built; otherwise / leads to the docs."""
    if (VIEWER / "index.html").is_file():
        app.mount("/", StaticFiles(directory=VIEWER, html=True), name="viewer")
        return

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/docs")
