"""What the routers share: the model catalog, the API error type, `Annotated` dependencies."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends
from starlette.requests import HTTPConnection

from model.bundle import Example, describe, load_config, load_examples
from model.config import CONTEXT_NOISE_MODES, SAMPLERS, SCHEDULES, BundleConfig
from server.inputs import InputError
from server.queue import Queue
from server.settings import Settings
from server.streams import EventHub


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


MAX_ECHO = 80  # characters of a client's value quoted back in an error message
MAX_FIELD = 120  # characters of a field name in an error
MAX_MESSAGE = 1000  # characters of an error message


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


_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_.\[\]]*): (.*)$", re.S)


def value_error(e: ValueError, config: BundleConfig | None = None, status: int = 422) -> ApiError:
    """Map a ValueError whose message starts with "field: " (model/, video, inputs) to a 4xx
    naming that field and, where a fixed set exists, its accepted values."""
    if isinstance(e, InputError):
        return ApiError(status, e.field, _unlisted(e.message, e.accepted), e.accepted)
    m = _FIELD.match(str(e))
    name, message = (m.group(1), m.group(2)) if m else (None, str(e))
    accepted = accepted_values(name, config)
    return ApiError(status, name, _unlisted(message, accepted), accepted)


_LISTED = re.compile(r" is not one of [\[(].*[\])]", re.S)


def _unlisted(message: str, accepted: Any) -> str:
    """model/ lists the accepted values in its messages; the API's body carries them in
    `accepted`, so the message drops its copy (clients show both, and 17 names twice is
    noise)."""
    return message if accepted is None else _LISTED.sub(" is not an accepted value", message)


def accepted_values(name: str | None, config: BundleConfig | None) -> Any:
    fixed: dict[str, Any] = {"schedule": list(SCHEDULES), "sampler": list(SAMPLERS),
                             "context_noise_mode": list(CONTEXT_NOISE_MODES)}
    if config is not None:
        actions = list(config.data.action_names) or f"0..{config.network.n_actions - 1}"
        fixed |= {"actions": actions, "context_actions": actions}
    return fixed.get(name or "")


@dataclass
class Catalog:
    """The bundles this API serves (configs only: the API never loads weights)."""

    paths: dict[str, Path]
    default: str
    configs: dict[str, BundleConfig] = field(default_factory=dict)
    max_frames: int | None = None  # the server's own frames-per-request limit (Settings)
    _examples: dict[str, dict[str, Example]] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> Catalog:
        paths = settings.bundles()
        default, path = settings.default_model(paths)
        paths.setdefault(default, path)
        return cls(paths, default, {k: load_config(p) for k, p in paths.items()},
                   settings.max_frames)

    def config(self, model_id: str | None) -> tuple[str, BundleConfig]:
        model_id = model_id or self.default
        if model_id not in self.configs:
            raise ApiError(422, "model", f"{clip(model_id)!r} is not a model this server serves",
                           sorted(self.configs))
        return model_id, self.configs[model_id]

    def describe(self, model_id: str) -> dict[str, Any]:
        doc = describe(self.configs[model_id], self.paths[model_id])
        # The limit this server enforces (model.request.prepare takes the smaller of the two).
        limit = min(doc["max_rollout_frames"], self.max_frames or doc["max_rollout_frames"])
        return {**doc, "id": model_id, "default": model_id == self.default,
                "max_rollout_frames": limit}

    def examples(self, model_id: str) -> dict[str, Example]:
        if model_id not in self._examples:
            self._examples[model_id] = load_examples(self.configs[model_id], self.paths[model_id])
        return self._examples[model_id]


RETRY_AFTER_S = (1, 5, 600)  # a 429's Retry-After: at least, when unknown, at most


def queue_full(queue: Queue, error: Exception) -> ApiError:
    """The 429 of a full queue, its Retry-After from the queue itself: when the soonest
    running job should end (server.queue.Queue.next_slot_s)."""
    low, unknown, high = RETRY_AFTER_S
    guess = queue.next_slot_s()
    seconds = unknown if guess is None else min(max(math.ceil(guess), low), high)
    return ApiError(429, None, str(error), headers={"Retry-After": str(seconds)})


OWNER_SCOPE = "dfserve.owner"  # set by server.auth.AuthMiddleware: the caller's owner id


def get_owner(conn: HTTPConnection) -> str | None:
    """The caller's owner id (a hash of its API key), or None when auth is off."""
    return conn.scope.get(OWNER_SCOPE)


def check_owner(job_owner: str | None, owner: str | None, job_id: str) -> None:
    """403 unless the caller may see this job (with auth on, only its owner may)."""
    if owner is not None and job_owner != owner:
        raise ApiError(403, "id", f"rollout {job_id!r} belongs to another API key")


def get_settings(conn: HTTPConnection) -> Settings:
    return conn.app.state.settings


def get_queue(conn: HTTPConnection) -> Queue:
    return conn.app.state.queue


def get_catalog(conn: HTTPConnection) -> Catalog:
    return conn.app.state.catalog


def get_hub(conn: HTTPConnection) -> EventHub:
    return conn.app.state.hub


SettingsDep = Annotated[Settings, Depends(get_settings)]
QueueDep = Annotated[Queue, Depends(get_queue)]
CatalogDep = Annotated[Catalog, Depends(get_catalog)]
OwnerDep = Annotated[str | None, Depends(get_owner)]
HubDep = Annotated[EventHub, Depends(get_hub)]
