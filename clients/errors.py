"""The client's exceptions, one per kind of refusal, and how an API answer maps onto them.

Every error the API sends has the shape {"detail": {"field", "message", "accepted"?}}
(DESIGN §3); the same detail arrives as an {"type": "error"} message on a WebSocket.
"""

from __future__ import annotations

from typing import Any

import httpx


class DfserveError(Exception):
    """An error answered by the API (or the stream); `status` is the HTTP status (0: none)."""

    def __init__(self, message: str, status: int = 0, field: str | None = None,
                 accepted: Any = None, body: Any = None) -> None:
        super().__init__(message)
        self.status, self.field, self.message = status, field, message
        self.accepted, self.body = accepted, body

    def __str__(self) -> str:
        where = f"{self.field}: " if self.field else ""
        ok = f" (accepted: {self.accepted})" if self.accepted is not None else ""
        code = f"{self.status} " if self.status else ""
        return f"{code}{where}{self.message}{ok}"


class BadRequest(DfserveError):
    """400/413/415/422: the request names a bad `field`; `accepted` lists the good values."""


class Unauthorized(DfserveError):
    """401: no or an unknown API key."""


class Forbidden(DfserveError):
    """403: the key may not see this resource."""


class NotFound(DfserveError):
    """404: unknown (or expired) rollout, model or session."""


class Conflict(DfserveError):
    """409: e.g. the video of a rollout that has not succeeded."""


class QueueFull(DfserveError):
    """429 after the retries: the queue is full; `retry_after` seconds is the server's hint."""

    def __init__(self, message: str, status: int = 0, field: str | None = None,
                 accepted: Any = None, body: Any = None, *,
                 retry_after: float | None = None) -> None:
        super().__init__(message, status, field, accepted, body)
        self.retry_after = retry_after


class ServerError(DfserveError):
    """5xx, or the server could not be reached after the retries."""


class RolloutFailed(DfserveError):
    """The rollout ended `failed` (its `message` is the server's error)."""


class SessionEnded(DfserveError):
    """The interactive session is over (stopped, idle, cancelled or failed)."""


BY_STATUS: dict[int, type[DfserveError]] = {
    400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict,
    413: BadRequest, 415: BadRequest, 422: BadRequest,
}  # fmt: skip


def api_error(status: int, body: Any, headers: Any = None) -> DfserveError:
    """The exception for an API error answer {detail: {field, message, accepted?}}."""
    detail = body.get("detail") if isinstance(body, dict) else body
    if isinstance(detail, dict):
        message, field, accepted = (str(detail.get("message", "")), detail.get("field"),
                                    detail.get("accepted"))  # fmt: skip
    else:
        message, field, accepted = str(detail or body or "error"), None, None
    kw = {"status": status, "field": field, "accepted": accepted, "body": body}
    if status == 429:
        return QueueFull(message, retry_after=retry_after(headers), **kw)
    cls = ServerError if status >= 500 else BY_STATUS.get(status, DfserveError)
    return cls(message, **kw)


def response_error(r: httpx.Response) -> DfserveError:
    """The exception for an HTTP answer of 400 or more (its body JSON, or else text)."""
    try:
        body: Any = r.json()
    except ValueError:
        body = r.text
    return api_error(r.status_code, body, r.headers)


def stream_error(doc: dict[str, Any]) -> DfserveError:
    """An {"type": "error"} message of a WebSocket as the matching exception."""
    detail = doc.get("detail") or {}
    status = doc.get("status") or (404 if detail.get("field") in ("id", "session") else 422)
    return api_error(int(status), {"detail": detail})


def retry_after(headers: Any) -> float | None:
    """The Retry-After header in seconds (never negative); None when absent or not a number."""
    value = headers.get("retry-after") if headers is not None else None
    try:
        return max(float(value), 0.0) if value is not None else None
    except ValueError:
        return None
