"""Every error the API answers, in one place: the ApiError shape {detail: {field, message,
accepted?}}, how a FieldError (model/, server/inputs.py) and a refused request body map to it,
and the app's exception handlers.

A ValueError that is not a FieldError is not the client's: it reaches no handler here and is
a 500, so a server bug never passes for bad input.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from typing import Any, Literal, get_args, get_origin

import redis
from fastapi import FastAPI, Request, WebSocket
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import HTTPConnection

from dfserve.model.errors import FieldError
from dfserve.server.queue import Queue, QueueFull

log = logging.getLogger(__name__)

MAX_ECHO = 80  # characters of a client's value quoted back in an error message
MAX_FIELD = 120  # characters of a field name in an error
MAX_MESSAGE = 1000  # characters of an error message
REDIS_RETRY_AFTER_S = 2  # Retry-After of the 503 answered while Redis is unreachable
RETRY_AFTER_S = (1, 5, 600)  # a 429's Retry-After: at least, when unknown, at most


class ApiError(Exception):
    """A 4xx answer: {detail: {field, message, accepted?}}."""

    def __init__(self, status: int, field: str | None, message: str, accepted: Any = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.field, self.message = status, field, message
        self.accepted, self.headers = accepted, headers

    def body(self) -> dict[str, Any]:
        # Bounded whatever a message quotes: a 10 MB `model` must not come back as a 10 MB
        # error (and field names can be the client's, e.g. an unknown JSON key).
        field = None if self.field is None else clip(self.field, MAX_FIELD)
        detail: dict[str, Any] = {"field": field, "message": shorten(self.message)}
        if self.accepted is not None:
            detail["accepted"] = self.accepted
        return {"detail": detail}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body exceeds {limit} bytes")
        self.limit = limit


def clip(value: object, limit: int = MAX_ECHO) -> str:
    """A client's value as quoted in an error: cut to `limit` characters, saying how many
    more there were."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def shorten(message: str, limit: int = MAX_MESSAGE) -> str:
    """An error message of at most about `limit` characters, keeping its start and its end
    (which says what was wrong) and cutting the middle, where long echoed values sit."""
    if len(message) <= limit:
        return message
    half = limit // 2
    return f"{message[:half]} ... ({len(message) - 2 * half} characters cut) ... " \
           f"{message[-half:]}"


def field_error(e: FieldError, status: int = 422) -> ApiError:
    return ApiError(status, e.field, e.message, e.accepted)


def queue_full_error(queue: Queue, error: QueueFull) -> ApiError:
    """The 429 of a full queue, its Retry-After from the queue itself: when the soonest
    running job should end (server.queue.Queue.next_slot_s)."""
    low, unknown, high = RETRY_AFTER_S
    guess = queue.next_slot_s()
    seconds = unknown if guess is None else min(max(math.ceil(guess), low), high)
    return ApiError(429, None, str(error), headers={"Retry-After": str(seconds)})


def validation_error(errors: Any, schema: type[BaseModel] | None = None) -> ApiError:
    """pydantic/FastAPI validation errors -> the API's error shape, naming the first field.
    `schema`, the model that refused the body, lists the accepted fields and names."""
    errors = list(errors)
    first: dict[str, Any] = dict(errors[0]) if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    # Union members add their type name to loc (actions.0.int); drop those.
    loc = [p for p in loc if p not in ("int", "str", "float", "bool", "list[str]")]
    field = ".".join(loc) or None
    accepted = None
    if first.get("type") == "extra_forbidden":
        accepted = sorted(schema.model_fields) if schema is not None else None
        message = "unknown field"
    elif first.get("type") == "json_invalid":
        message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
    elif first.get("type") == "literal_error" and (names := _names(schema, loc)):
        accepted = names  # worded as model/ words a name it does not know (FieldError)
        message = f"{first.get('input')!r} is not an accepted value"
    else:
        message = f"{first.get('msg')} (got {first.get('input')!r})"[:500]
    return ApiError(422, field, message, accepted)


def _names(schema: type[BaseModel] | None, loc: list[str]) -> list[Any] | None:
    """The names a Literal field of `schema` accepts (also inside `X | None`)."""
    if schema is None or len(loc) != 1 or loc[0] not in schema.model_fields:
        return None
    kind = schema.model_fields[loc[0]].annotation
    for option in (kind, *get_args(kind)):
        if get_origin(option) is Literal:
            return list(get_args(option))
    return None


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(FieldError)
    async def bad_field(request: Request, e: FieldError) -> JSONResponse:
        return field_error(e).response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return validation_error(e.errors()).response()

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
        return ApiError(503, None, "the job queue (Redis) is unavailable; retry shortly",
                        headers={"Retry-After": str(REDIS_RETRY_AFTER_S)}).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        if e.status_code != 405:
            return await http_exception_handler(request, e)
        # Starlette's 405 names the methods of the first route whose path matched (GET, HEAD
        # for /v1/rollouts, which POST serves too): name those of every route of the path.
        allow = ", ".join(_allowed_methods(request))
        if request.method == "OPTIONS":
            return Response(status_code=204, headers={"Allow": allow})
        return ApiError(405, None, f"{request.method} is not allowed here; use {allow}",
                        headers={"Allow": allow}).response()

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, e: BodyTooLarge) -> JSONResponse:
        return ApiError(413, None, str(e)).response()


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
