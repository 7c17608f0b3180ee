"""API keys and per-key rate limits (DESIGN §3 "Auth"): one ASGI middleware over /v1.

- With DFSERVE_API_KEYS set, every HTTP request and WebSocket under /v1 needs a key:
  `Authorization: Bearer KEY`, or for a WebSocket that header or `?token=KEY` (browsers
  cannot set headers on a WebSocket). Missing or wrong: 401 (a WebSocket gets an HTTP 401
  denial response where the server supports it, else it is closed with 1008 before accept).
- Keys are compared in constant time: the SHA-256 of the presented key against the SHA-256
  of every configured key with hmac.compare_digest, never stopping at the first match.
- A key is never stored nor logged: a job's owner is `owner_id(key)`, a SHA-256 prefix.
  Routes read it with `deps.OwnerDep`; a key sees only its own jobs (403 otherwise).
- Rate limit (DFSERVE_RATE_LIMIT_PER_MIN): a token bucket per key (per client address when
  no keys are configured) holding a minute's worth of requests, refilled continuously. It
  lives in this API process's memory, so it needs no Redis round trip and keeps working
  while Redis is down; with N API replicas a key may make up to N times the rate. Each
  request or WebSocket under /v1 takes one token; when empty: 429 with Retry-After.
- Everything outside /v1 stays open: /healthz, /readyz, /metrics, /docs, /openapi.json, /.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from collections.abc import Callable
from urllib.parse import parse_qsl, urlencode

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from dfserve.server.errors import ApiError

OWNER_SCOPE = "dfserve.owner"  # the caller's owner id, in the ASGI scope (routes.deps reads it)

PROTECTED = "/v1"
MAX_BUCKETS = 100_000  # distinct clients remembered before full buckets are forgotten


def owner_id(key: str) -> str:
    """What a job stores as its owner: a hash of the key, never the key itself."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:32]


def presented_key(scope: Scope) -> str | None:
    """The key of a request: the Bearer header, or (WebSocket only) the `token` parameter."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    if scope["type"] == "websocket":
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"))
        tokens = [v for k, v in query if k == "token"]
        return tokens[-1] if tokens else None
    return None


def strip_token(scope: Scope) -> None:
    """Remove `token` from the query string, in place: the server's access log (uvicorn logs
    the scope it handed the app) must never show a key."""
    raw = scope.get("query_string", b"")
    if b"token" in raw:
        query = parse_qsl(raw.decode("latin-1"), keep_blank_values=True)
        scope["query_string"] = urlencode([(k, v) for k, v in query if k != "token"]).encode()


class KeyChecker:
    def __init__(self, keys: list[str]) -> None:
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def valid(self, key: str) -> bool:
        digest = hashlib.sha256(key.encode()).digest()
        ok = False
        for known in self._digests:  # no early exit: the time says nothing about which key
            ok |= hmac.compare_digest(known, digest)
        return ok


class TokenBuckets:
    """`per_min` requests a minute per client, bursts up to `per_min`; thread-safe."""

    def __init__(self, per_min: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity, self.rate, self.clock = float(per_min), per_min / 60.0, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, client: str) -> float:
        """0 if a token was taken, else the seconds until one is available."""
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.get(client, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - at) * self.rate)
            if len(self._buckets) >= MAX_BUCKETS:  # forget clients whose bucket is full again
                self._buckets = {c: (t, a) for c, (t, a) in self._buckets.items()
                                 if t + (now - a) * self.rate < self.capacity}  # fmt: skip
            if tokens >= 1.0:
                self._buckets[client] = (tokens - 1.0, now)
                return 0.0
            self._buckets[client] = (tokens, now)
            return (1.0 - tokens) / self.rate


class AuthMiddleware:
    """Authenticates and rate-limits /v1; stores the caller's owner id in the ASGI scope."""

    def __init__(self, app: ASGIApp, api_keys: list[str], rate_limit_per_min: int | None) -> None:
        self.app = app
        self.keys = KeyChecker(api_keys)
        self.buckets = TokenBuckets(rate_limit_per_min) if rate_limit_per_min else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] not in ("http", "websocket") or not (
                path == PROTECTED or path.startswith(PROTECTED + "/")):  # fmt: skip
            await self.app(scope, receive, send)
            return
        owner = None
        if self.keys:
            key = presented_key(scope)
            strip_token(scope)
            if key is None or not self.keys.valid(key):
                error = ApiError(401, "authorization", "a valid API key is needed: "
                                 "'Authorization: Bearer KEY'" + (" or ?token=KEY" if
                                 scope["type"] == "websocket" else ""))  # fmt: skip
                await _deny(scope, send, error, {"WWW-Authenticate": "Bearer"})
                return
            owner = owner_id(key)
        if self.buckets is not None:
            client = owner or (scope.get("client") or ("?",))[0]
            wait = self.buckets.take(client)
            if wait > 0:
                retry = str(max(1, math.ceil(wait)))
                error = ApiError(429, None, f"rate limit exceeded: retry in {retry}s")
                await _deny(scope, send, error, {"Retry-After": retry})
                return
        scope[OWNER_SCOPE] = owner
        await self.app(scope, receive, send)


async def _deny(scope: Scope, send: Send, error: ApiError, headers: dict[str, str]) -> None:
    response = JSONResponse(error.body(), status_code=error.status, headers=headers)
    if scope["type"] == "http":
        await response(scope, _disconnected, send)
    elif "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": error.status,
                    "headers": response.raw_headers})
        await send({"type": "websocket.http.response.body", "body": response.body})
    else:  # no denial responses: closing before accept makes the server answer 403
        await send({"type": "websocket.close", "code": 1008, "reason": error.message[:120]})


async def _disconnected() -> dict[str, str]:
    return {"type": "http.disconnect"}
