"""Liveness, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from dfserve.server.auth import KeyChecker, presented_key
from dfserve.server.metrics import CONTENT_TYPE
from dfserve.server.routes.deps import QueueDep, SettingsDep
from dfserve.server.schemas import Health, Ready
from dfserve.server.settings import Settings

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """Live: the process answers (says nothing about Redis or workers)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Ready, responses={503: {"model": Ready}})
def readyz(request: Request, queue: QueueDep, settings: SettingsDep) -> JSONResponse:
    """Ready: Redis reachable, and a worker with a fresh heartbeat has warmed its model up.
    The workers (hosts, pids, live jobs) are listed only to a caller with an API key when
    keys are set: the probe itself needs no key and learns only ready or not, and why."""
    redis_ok = queue.ping()
    workers = queue.workers() if redis_ok else []
    warm = [w for w in workers if w.get("warmed_up")]
    reason = None if warm else ("Redis is unreachable" if not redis_ok else
                                "no worker with a warmed-up model has a fresh heartbeat")
    shown = workers if _may_see_internals(request, settings) else []
    body = Ready(ready=reason is None, redis=redis_ok, workers=shown, reason=reason)
    return JSONResponse(body.model_dump(), status_code=200 if reason is None else 503)


def _may_see_internals(request: Request, settings: Settings) -> bool:
    if not settings.api_keys:
        return True  # no auth: nothing is private
    key = presented_key(request.scope)
    return key is not None and KeyChecker(settings.api_keys).valid(key)


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus text format."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)
