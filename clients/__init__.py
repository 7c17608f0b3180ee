"""Python client of a dfserve server: `from clients import Client, AsyncClient`."""

from dfserve.clients.client import (
    AsyncClient,
    AsyncRollout,
    AsyncSession,
    BadRequest,
    Client,
    Conflict,
    DfserveError,
    Forbidden,
    NotFound,
    QueueFull,
    Rollout,
    RolloutFailed,
    RolloutParams,
    RolloutStatus,
    ServerError,
    Session,
    SessionEnded,
    SessionParams,
    Unauthorized,
)

__all__ = [
    "AsyncClient", "AsyncRollout", "AsyncSession", "BadRequest", "Client", "Conflict",
    "DfserveError", "Forbidden", "NotFound", "QueueFull", "Rollout", "RolloutFailed",
    "RolloutParams", "RolloutStatus", "ServerError", "Session", "SessionEnded", "SessionParams",
    "Unauthorized",
]  # fmt: skip
