"""One Redis reader per API process for every open stream: WS /v1/rollouts/{id}/stream and
WS /v1/sessions wait here for their job's next event instead of each blocking a thread and a
Redis connection on XREAD (which capped a process at the pool's size, about 100 streams).

The hub's thread runs one `XREAD BLOCK` over the event streams of every watched job
(`Queue.newest_events`) and wakes the subscriptions of the jobs that got something; a woken
subscriber reads its events itself, without blocking, from its own cursor (`Queue.events`),
so replay, resume and per-socket formats stay where they were. The hub also reads the queue
position of every watched job once a second, in one pipelined call, and wakes the sockets
whose job moved up. Holding 1,000 streams costs one connection and one thread.

No wake-up is lost: a subscriber waits only after a read found nothing after its cursor c,
and the hub reads each job from the smallest cursor of its subscribers, or from an id it
already reported when that is later (an event the read would have found, so reported while
the read was in flight, which makes `wait` return at once).

`pump_events` is the one loop both WebSockets run on a subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis
from starlette.concurrency import run_in_threadpool

from dfserve.server.queue import Event, Job, JobStatus, Queue, events_cursor, stream_id

log = logging.getLogger(__name__)

HUB_BLOCK_MS = 100  # one XREAD; a new subscription is read from within this long
HUB_POSITIONS_S = 1.0  # how often the queue positions of every watched job are read (one call)
HUB_BACKOFF_S = 1.0  # after a Redis error (the subscribers' own reads report it to clients)


class Subscription:
    """One socket's interest in one job's events. `cursor` is the id of the last event it
    has read; the pump moves it forward as it sends."""

    def __init__(self, hub: EventHub, job_id: str, cursor: str) -> None:
        self.hub, self.job_id, self.cursor = hub, job_id, cursor
        self.reports = 0  # how many times the hub has reported news of this job
        self.position: int | None = None  # place in line (None: not queued), from the hub
        self.positioned = False  # whether the hub has read `position` yet
        self.woken = asyncio.Event()

    async def wait(self, since: int, timeout_s: float) -> bool:
        """Until the hub reports news after `since` (the value of `reports` taken before the
        read that found nothing), or timeout_s passes; True when there is news. A report
        that came while that read was in flight counts: it returns at once."""
        if self.reports != since:
            return True
        self.woken.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.woken.wait(), timeout_s)
        return self.reports != since

    def close(self) -> None:
        self.hub.unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventHub:
    """Started and stopped by the app's lifespan; subscribe from the event loop it runs."""

    def __init__(self, queue: Queue, block_ms: int = HUB_BLOCK_MS) -> None:
        self.queue, self.block_ms = queue, block_ms
        self._subs: dict[str, set[Subscription]] = {}
        self._reported: dict[str, str] = {}  # job id -> newest event id reported
        self._lock = threading.Lock()  # _subs and _reported: the loop writes, the thread reads
        self._wanted = threading.Event()  # set while there is something to watch
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="dfserve-event-hub", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wanted.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def subscribe(self, job_id: str, cursor: str) -> Subscription:
        sub = Subscription(self, job_id, cursor)
        with self._lock:
            self._subs.setdefault(job_id, set()).add(sub)
            self._wanted.set()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            subs = self._subs.get(sub.job_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[sub.job_id]
                    self._reported.pop(sub.job_id, None)
            if not self._subs:
                self._wanted.clear()

    @property
    def watched(self) -> int:
        """Jobs watched now (for tests and /metrics-style checks)."""
        return len(self._subs)

    # ------------------------------------------------------------ the hub's thread

    def _cursors(self) -> dict[str, str]:
        """Per job, where the XREAD starts: the smallest cursor of its subscribers, or the
        newest id already reported when that is later (nothing before it is news)."""
        with self._lock:
            out = {}
            for job_id, subs in self._subs.items():
                lowest = min((s.cursor for s in subs), key=stream_id)
                reported = self._reported.get(job_id)
                out[job_id] = (reported if reported is not None
                               and stream_id(reported) > stream_id(lowest) else lowest)
            return out

    def _run(self) -> None:
        positions_due = 0.0
        while not self._stopping.is_set():
            if not self._wanted.wait(timeout=1.0):
                continue
            cursors = self._cursors()
            try:
                if time.monotonic() >= positions_due:  # one pipelined ZRANK per watched job
                    positions_due = time.monotonic() + HUB_POSITIONS_S
                    self._call_soon(self._place, self.queue.positions(list(cursors)))
                newest = self.queue.newest_events(cursors, self.block_ms)
            except redis.RedisError as e:
                log.warning("event hub: Redis error (%s); retrying in %g s", e, HUB_BACKOFF_S)
                self._stopping.wait(HUB_BACKOFF_S)
                continue
            if newest:
                with self._lock:
                    self._reported.update(
                        (j, i) for j, i in newest.items() if j in self._subs)
                self._call_soon(self._wake, newest)

    def _call_soon(self, callback: Callable[[dict[str, Any]], None], arg: dict[str, Any]
                   ) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed: shutting down
            self._loop.call_soon_threadsafe(callback, arg)

    def _place(self, positions: dict[str, int | None]) -> None:
        """In the event loop: record each job's place in line; wake (without news) the
        subscribers whose job moved, so a queued client hears of it."""
        for job_id, position in positions.items():
            for sub in self._subs.get(job_id, ()):
                moved = sub.positioned and sub.position != position
                sub.position, sub.positioned = position, True
                if moved:
                    sub.woken.set()

    def _wake(self, newest: dict[str, str]) -> None:
        """In the event loop: tell the subscribers of each job what the hub saw."""
        for job_id in newest:
            for sub in self._subs.get(job_id, ()):
                sub.reports += 1
                sub.woken.set()


# ------------------------------------------------------------ one socket's pump

STREAM_POLL_S = 1.0  # a quiet stream wakes this often (to see its client has left)
STREAM_CHECK_S = 30.0  # and checks this often that its job still exists (jobs expire)
STREAM_COUNT = 64  # events per read (frames carry their PNGs)

Send = Callable[[dict[str, Any]], Awaitable[None]]


async def pump_events(queue: Queue, hub: EventHub, job: Job, after: int, send: Send,
                      deliver: Callable[[Event], Awaitable[bool]], expired: dict[str, Any],
                      gone: asyncio.Event | None = None) -> None:
    """A job's events, from Redis to one socket (WS /v1/rollouts/{id}/stream and
    WS /v1/sessions), each handed to `deliver` in order from frame `after` on, until
    `deliver` returns True (after `done`) or the client is `gone`.

    Between events it waits on the hub without reading Redis. Meanwhile it tells a queued
    client where it stands (`send`, when the hub saw its place change), and now and then
    checks that the job has not expired (then it sends `expired` and returns)."""
    position = job.queue_position
    if job.status is JobStatus.queued:
        await send({"type": "queued", "position": position})
    loop = asyncio.get_running_loop()
    check_at = loop.time() + STREAM_CHECK_S

    def left() -> bool:
        return gone is not None and gone.is_set()

    with hub.subscribe(job.id, events_cursor(after)) as sub:
        while not left():
            mark = sub.reports
            events = await run_in_threadpool(queue.events, job.id, after, 0, sub.cursor,
                                             STREAM_COUNT)
            while not events and not left() and not await sub.wait(mark, STREAM_POLL_S):
                if sub.positioned and sub.position is not None and sub.position != position:
                    position = sub.position
                    await send({"type": "queued", "position": position})
                if loop.time() >= check_at:
                    check_at = loop.time() + STREAM_CHECK_S
                    if not (await run_in_threadpool(queue.standing, job.id))[0]:
                        await send(expired)
                        return
            for ev in events:
                sub.cursor = ev.id
                if await deliver(ev):
                    return
