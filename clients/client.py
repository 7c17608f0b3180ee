"""Python client of the dfserve API (DESIGN §3): `Client` (sync) and `AsyncClient` (asyncio).

    from dfserve.clients import Client

    with Client("http://127.0.0.1:8000", api_key=None) as c:
        r = c.rollout(example="walk", frames=32, seed=1)
        for frame in r.frames(format="png"):  # numpy uint8 (R, R, 3), as they are generated
            ...
        open("out.mp4", "wb").write(r.video())
        with c.session(example="walk", seed=1) as s:  # interactive play (WS /v1/sessions)
            frame = s.step("move_left")

HTTP errors become typed exceptions (DfserveError and its subclasses, with the API's `field`
and `accepted` values). 429 and 503 are retried with exponential backoff that honours
Retry-After; every POST carries an Idempotency-Key, so a retried submit never runs twice. A
dropped frame stream reconnects with `after=` the last frame seen and goes on seamlessly.
The client depends on httpx, websockets, numpy and Pillow only (not on the server's code).

This module gathers the public names. Each call is written once, as a program of I/O
operations (operations.py) in core.py, rollouts.py and sessions.py, that sync.py performs
with blocking I/O and aio.py awaits.
"""

from dfserve.clients.aio import AsyncClient, AsyncRollout, AsyncSession
from dfserve.clients.core import RETRY_STATUSES
from dfserve.clients.errors import (
    BadRequest,
    Conflict,
    DfserveError,
    Forbidden,
    NotFound,
    QueueFull,
    RolloutFailed,
    ServerError,
    SessionEnded,
    Unauthorized,
)
from dfserve.clients.images import ImageLike, decode_image, encode_image
from dfserve.clients.params import Action, RolloutParams, SessionParams, rollout_body
from dfserve.clients.status import TERMINAL, Progress, RolloutStatus
from dfserve.clients.sync import Client, Rollout, Session

__all__ = [
    "RETRY_STATUSES", "TERMINAL", "Action", "AsyncClient", "AsyncRollout", "AsyncSession",
    "BadRequest", "Client", "Conflict", "DfserveError", "Forbidden", "ImageLike", "NotFound",
    "Progress", "QueueFull", "Rollout", "RolloutFailed", "RolloutParams", "RolloutStatus",
    "ServerError", "Session", "SessionEnded", "SessionParams", "Unauthorized", "decode_image",
    "encode_image", "rollout_body",
]  # fmt: skip
