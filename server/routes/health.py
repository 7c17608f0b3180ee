"""Liveness, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from server.metrics import CONTENT_TYPE
from server.routes.deps import QueueDep
from server.schemas import Health, Ready

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """Live: the process answers (says nothing about Redis or workers)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Ready, responses={503: {"model": Ready}})
def readyz(queue: QueueDep) -> JSONResponse:
    """Ready: Redis reachable, and a worker with a fresh heartbeat has warmed its model up."""
    redis_ok = queue.ping()
    workers = queue.workers() if redis_ok else []
    warm = [w for w in workers if w.get("warmed_up")]
    reason = None if warm else ("Redis is unreachable" if not redis_ok else
                                "no worker with a warmed-up model has a fresh heartbeat")
    body = Ready(ready=reason is None, redis=redis_ok, workers=workers, reason=reason)
    return JSONResponse(body.model_dump(), status_code=200 if reason is None else 503)


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus text format."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)
