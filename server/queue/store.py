"""What every part of the queue shares: the client, the key layout, the limits, the
consumer group, and `connect`, which makes the client.

The API and the worker share one synchronous client: `redis.Redis` in production,
`fakeredis.FakeRedis(server=...)` in embedded mode (API threads and a worker thread on one
in-process server). The client must use `decode_responses=False` (frames and videos are raw
bytes) and RESP2 (the default). No Lua: fakeredis would need lupa, so the read-modify-write
steps are optimistic WATCH/MULTI transactions.
"""

from __future__ import annotations

import logging
from typing import Any

import redis

from dfserve.server.queue.keys import GROUP, Keys

log = logging.getLogger(__name__)

PENDING_TTL_S = 7 * 86_400  # TTL while a job is live: generous, but nothing is orphaned forever


class Store:
    """The client and settings the queue's parts work on; holds no mutable state, so one
    instance is safe to share between threads."""

    def __init__(self, redis_client: redis.Redis, prefix: str = "dfserve", lease_ms: int = 30_000,
                 max_deliveries: int = 3, job_ttl_s: int = 86_400, max_queued: int = 1000) -> None:
        # Typed Any: redis-py's stubs type every reply as a union over sync/async clients and
        # RESP2/RESP3 shapes; this package knows the RESP2 shapes and decodes them itself.
        self.redis: Any = redis_client
        self.keys = Keys(prefix)
        self.lease_ms, self.max_deliveries = lease_ms, max_deliveries
        self.job_ttl_s, self.max_queued = job_ttl_s, max_queued
        self._pending_ttl_s = max(PENDING_TTL_S, job_ttl_s)
        self._fake = type(redis_client).__module__.startswith("fakeredis")
        try:
            self._ensure_group()
        except redis.ConnectionError as e:  # the API must start (and say "not ready") anyway
            log.warning("Redis unreachable (%s); the consumer group is made on first claim", e)

    def ping(self) -> bool:
        try:
            return bool(self.redis.ping())
        except redis.RedisError:
            return False

    def _ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(self.keys.jobs, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def _recreate_group(self, error: redis.ResponseError) -> None:
        """After NOGROUP (the stream vanished: FLUSHALL, Redis restarted without AOF), recreate
        the group so workers recover by themselves; re-raise any other error."""
        if "NOGROUP" not in str(error):
            raise error
        log.warning("job stream or consumer group missing: recreating it")
        self._ensure_group()

    def _ack(self, pipe: Any, entry_id: str) -> Any:
        """Queue on `pipe` the acknowledgement of a job-stream entry: the job needs no worker."""
        # XDEL after XACK keeps the job stream as small as the backlog.
        pipe.xack(self.keys.jobs, GROUP, entry_id)
        pipe.xdel(self.keys.jobs, entry_id)
        return pipe


def connect(url: str | None, fake_server: Any = None, timeout_s: float = 10.0,
            max_connections: int | None = None) -> Any:
    """A client for `url`, or, with no url, for an in-process fakeredis server (the embedded
    mode: pass the same FakeServer to every client that must share the queue).

    timeout_s bounds every command, so a Redis that hangs (stopped, swapping, a dead network
    path) turns into redis.TimeoutError (503 from the API, backoff in the worker) instead of a
    thread blocked forever; it must exceed the longest blocking read here (1 s).

    max_connections: a pool of at most that many connections, where a caller that finds them
    all in use waits for one (up to timeout_s) instead of failing with "Too many
    connections" (redis-py's default pool fails at 100, fewer than the API's threads)."""
    if url is None:
        import fakeredis

        return fakeredis.FakeRedis(server=fake_server or fakeredis.FakeServer())
    options: dict[str, Any] = {"socket_connect_timeout": min(5.0, timeout_s),
                               "socket_timeout": timeout_s, "socket_keepalive": True,
                               "health_check_interval": 30}
    if max_connections is None:
        return redis.Redis.from_url(url, **options)
    pool = redis.BlockingConnectionPool.from_url(url, max_connections=max_connections,
                                                 timeout=timeout_s, **options)
    return redis.Redis.from_pool(pool)
