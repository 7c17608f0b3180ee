"""The routers' `Annotated` dependencies: the app's settings, queue, model catalog and event
hub, the caller (its owner id), and a job the caller may see."""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import Depends
from starlette.requests import HTTPConnection

from dfserve.server.auth import OWNER_SCOPE
from dfserve.server.catalog import Catalog
from dfserve.server.errors import ApiError
from dfserve.server.queue import Job, Queue
from dfserve.server.settings import Settings
from dfserve.server.streams import EventHub


def get_owner(conn: HTTPConnection) -> str | None:
    """The caller's owner id (a hash of its API key), or None when auth is off."""
    return conn.scope.get(OWNER_SCOPE)


def get_settings(conn: HTTPConnection) -> Settings:
    return cast(Settings, conn.app.state.settings)


def get_queue(conn: HTTPConnection) -> Queue:
    return cast(Queue, conn.app.state.queue)


def get_catalog(conn: HTTPConnection) -> Catalog:
    return cast(Catalog, conn.app.state.catalog)


def get_hub(conn: HTTPConnection) -> EventHub:
    return cast(EventHub, conn.app.state.hub)


SettingsDep = Annotated[Settings, Depends(get_settings)]
QueueDep = Annotated[Queue, Depends(get_queue)]
CatalogDep = Annotated[Catalog, Depends(get_catalog)]
OwnerDep = Annotated[str | None, Depends(get_owner)]
HubDep = Annotated[EventHub, Depends(get_hub)]


def job_not_found(job_id: str) -> ApiError:
    return ApiError(404, "id", f"no rollout {job_id!r} (unknown, or expired after the job TTL)")


def visible_job(job: Job | None, job_id: str, owner: str | None) -> Job:
    """The job, if it exists and the caller may see it: 404, or 403 for another API key's
    job (with auth on, only its owner may see it)."""
    if job is None:
        raise job_not_found(job_id)
    if owner is not None and job.owner != owner:
        raise ApiError(403, "id", f"rollout {job_id!r} belongs to another API key")
    return job


def get_owned_job(rollout_id: str, queue: QueueDep, owner: OwnerDep) -> Job:
    return visible_job(queue.get(rollout_id), rollout_id, owner)


OwnedJobDep = Annotated[Job, Depends(get_owned_job)]
