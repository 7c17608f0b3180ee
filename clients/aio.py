"""The asyncio client: `AsyncClient`, `AsyncRollout`, `AsyncSession`, the same methods as
sync.py's, awaited. Each runs the shared program with httpx's and websockets' asyncio API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Generator, Sequence
from typing import Any, TypeVar, Unpack

import httpx
from websockets.asyncio.client import connect

import dfserve.clients.operations as ops
from dfserve.clients.core import ClientCore
from dfserve.clients.params import Action, RolloutParams, SessionParams, rollout_body
from dfserve.clients.rollouts import RolloutCore
from dfserve.clients.sessions import SessionCore
from dfserve.clients.status import RolloutStatus
from dfserve.clients.stream import Event, is_frame

T = TypeVar("T")


class AsyncClient(ClientCore):
    """The asyncio twin of Client: the same methods, awaited."""

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, *,
                 timeout: float = 60.0, retries: int = 5, backoff: float = 0.5,
                 max_backoff: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(url, api_key, timeout, retries, backoff, max_backoff)
        self.http = httpx.AsyncClient(base_url=self.url, timeout=timeout,
                                      headers=self._headers(), transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def request(self, method: str, path: str, *, json: Any = None,
                      headers: dict[str, str] | None = None) -> httpx.Response:
        return await self._run(self._request(method, path, json, headers))

    async def models(self) -> list[dict[str, Any]]:
        return await self._run(self._models())

    async def model(self, model_id: str) -> dict[str, Any]:
        return await self._run(self._model(model_id))

    async def rollout(self, *, idempotency_key: str | None = None,
                      **params: Unpack[RolloutParams]) -> AsyncRollout:
        return AsyncRollout(self, await self._run(self._submit(params, idempotency_key)))

    async def get(self, rollout_id: str) -> AsyncRollout:
        return AsyncRollout(self, await self._run(self._fetch(rollout_id)))

    def session(self, *, format: str = "png", as_: str = "numpy", timeout: float = 120.0,
                **params: Unpack[SessionParams]) -> AsyncSession:
        """`async with client.session(...) as s: frame = await s.step("left")`; or
        `s = await client.session(...)` and `await s.close()` at the end."""
        return AsyncSession(self, rollout_body(**params), format, as_, timeout)

    def _ws(self, url: str) -> Any:
        return connect(url, additional_headers=self._headers(), open_timeout=self.timeout,
                       max_size=None, max_queue=None)

    async def _run(self, program: ops.Program[T]) -> T:
        """Run a shared program, awaiting its operations."""
        step = ops.Stepper(program)
        while step.operation is not None:
            step.resume(await ops.async_outcome(self._perform(step.operation)))
        return step.result

    async def _perform(self, op: ops.Operation) -> Any:
        match op:
            case ops.Call():
                return await self.http.request(op.method, op.path, json=op.json,
                                               headers=op.headers)  # fmt: skip
            case ops.Sleep(seconds=seconds):
                return await asyncio.sleep(seconds)
            case ops.Connect(url=url):
                return await self._ws(url)
            case ops.Send(ws=ws, text=text):
                return await ws.send(text)
            case ops.Recv(ws=ws, timeout=timeout):
                return await asyncio.wait_for(ws.recv(), timeout)
            case ops.Close(ws=ws):
                return await ws.close()
        raise TypeError(f"not an operation: {op!r}")


class AsyncRollout(RolloutCore):
    """The asyncio twin of Rollout; `events()` and `frames()` are async iterators."""

    client: AsyncClient

    async def status(self) -> RolloutStatus:
        return await self.client._run(self._status())

    async def wait(self, timeout: float | None = None, poll: float = 0.2) -> RolloutStatus:
        return await self.client._run(self._wait(timeout, poll))

    async def video(self, timeout: float | None = None) -> bytes:
        return await self.client._run(self._video(timeout))

    async def frame(self, index: int, as_: str = "numpy") -> Any:
        return await self.client._run(self._frame(index, as_))

    async def cancel(self) -> RolloutStatus:
        return await self.client._run(self._cancel())

    async def events(self, format: str = "png", after: int = -1, as_: str = "bytes",
                     timeout: float = 120.0) -> AsyncGenerator[Event, None]:
        stream = self._stream(format, after, as_, timeout)
        try:
            while (event := await self.client._run(stream.next_event())) is not None:
                yield event
        finally:
            await self.client._run(stream.close())

    def frames(self, format: str = "png", as_: str = "numpy", after: int = -1,
               timeout: float = 120.0) -> AsyncGenerator[Any, None]:
        return (ev["image"] async for ev in self.events(format, after, as_, timeout)
                if is_frame(ev))


class AsyncSession(SessionCore):
    """Opened by `await` or `async with` (once, whichever comes first)."""

    client: AsyncClient

    def __init__(self, client: AsyncClient, start: dict[str, Any], format: str, as_: str,
                 timeout: float) -> None:
        super().__init__(client, as_, timeout)
        self.start, self.format = start, format

    def __await__(self) -> Generator[Any, None, AsyncSession]:
        return self._opened().__await__()

    async def __aenter__(self) -> AsyncSession:
        return await self._opened()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _opened(self) -> AsyncSession:
        """Connected and started (once): what both `await` and `async with` give."""
        if self.ws is None:
            await self.client._run(self._open(self.start, self.format))
        return self

    async def step(self, action: Action | Sequence[Action]) -> Any:
        return await self.client._run(self._step(action))

    async def close(self) -> dict[str, Any] | None:
        return await self.client._run(self._close())
