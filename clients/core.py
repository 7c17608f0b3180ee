"""What `Client` and `AsyncClient` share: the settings of one server and the API's HTTP calls,
each written once as a program (operations.py) that either client performs.

Every call retries 429 and 503 with exponential backoff that honours Retry-After; a
connection error is retried too where that is safe: GET and DELETE, and a POST with an
Idempotency-Key (every submit carries one, so a retried submit never runs twice).
"""

from __future__ import annotations

import os
import uuid
from typing import Any
from urllib.parse import urlencode

import httpx

from dfserve.clients.errors import ServerError, response_error, retry_after
from dfserve.clients.operations import Call, Program, Sleep
from dfserve.clients.params import RolloutParams, rollout_body

RETRY_STATUSES = (429, 503)


class ClientCore:
    def __init__(self, url: str, api_key: str | None, timeout: float, retries: int,
                 backoff: float, max_backoff: float) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("DFSERVE_API_KEY")
        self.timeout, self.retries = timeout, retries
        self.backoff, self.max_backoff = backoff, max_backoff

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _ws_url(self, path: str, **query: Any) -> str:
        base = "ws" + self.url[4:] if self.url.startswith("http") else self.url
        query = {k: v for k, v in query.items() if v is not None}
        return base + path + (f"?{urlencode(query)}" if query else "")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff, never shorter than the server's Retry-After."""
        # annotated: typeshed types int ** int as Any (a negative power is a float)
        delay: float = min(self.backoff * 2**attempt, self.max_backoff)
        return max(delay, retry_after) if retry_after is not None else delay

    def _request(self, method: str, path: str, json: Any = None,
                 headers: dict[str, str] | None = None) -> Program[httpx.Response]:
        """One API call, retried as the module says; the typed error of a 4xx/5xx answer."""
        retry_transport = method in ("GET", "DELETE") or "Idempotency-Key" in (headers or {})
        for attempt in range(self.retries + 1):
            try:
                r: httpx.Response = yield Call(method, path, json, headers)
            except httpx.TransportError as e:
                if not retry_transport or attempt >= self.retries:
                    raise ServerError(f"{method} {path}: {e!r}") from e
                yield Sleep(self._delay(attempt, None), backoff=True)
                continue
            if r.status_code in RETRY_STATUSES and attempt < self.retries:
                yield Sleep(self._delay(attempt, retry_after(r.headers)), backoff=True)
                continue
            if r.status_code >= 400:
                raise response_error(r)
            return r
        raise AssertionError("unreachable")

    def _models(self) -> Program[list[dict[str, Any]]]:
        return list((yield from self._request("GET", "/v1/models")).json()["models"])

    def _model(self, model_id: str) -> Program[dict[str, Any]]:
        return dict((yield from self._request("GET", f"/v1/models/{model_id}")).json())

    def _submit(self, params: RolloutParams,
                idempotency_key: str | None) -> Program[dict[str, Any]]:
        """POST /v1/rollouts; the created rollout's document (id, status, notes, ...)."""
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        body = rollout_body(**params)
        return dict((yield from self._request("POST", "/v1/rollouts", body, headers)).json())

    def _fetch(self, rollout_id: str) -> Program[dict[str, Any]]:
        """GET /v1/rollouts/{id}: the rollout's status document, as the API sent it."""
        return dict((yield from self._request("GET", f"/v1/rollouts/{rollout_id}")).json())
