"""Prometheus metrics of the API process (GET /metrics).

Queue depth, job and frame counters come from Redis at scrape time (queue.stats(), written by
every API and worker process), so they are service-wide, not per process. Request latency is
this API process's own histogram, labelled by route template.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dfserve.server.queue import JobStatus, Queue

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class QueueCollector(Collector):
    def __init__(self, get_queue: Any) -> None:
        self.get_queue = get_queue  # the app's queue exists only once its lifespan started

    def collect(self) -> Iterator[Metric]:
        queue: Queue | None = self.get_queue()
        up = GaugeMetricFamily("dfserve_redis_up", "1 if Redis answered this scrape")
        if queue is None:
            up.add_metric([], 0)
            yield up
            return
        try:
            depth, stats, workers = queue.queued_count(), queue.stats(), queue.workers()
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield GaugeMetricFamily("dfserve_queue_depth", "jobs waiting to start", value=depth)
        yield GaugeMetricFamily("dfserve_workers", "workers with a fresh heartbeat",
                                value=len(workers))
        yield GaugeMetricFamily("dfserve_rollouts_running", "rollouts in the workers' batches",
                                value=sum(int(w.get("live", 0)) for w in workers))
        yield CounterMetricFamily("dfserve_jobs_submitted", "jobs accepted by the API",
                                  value=stats.get("submitted", 0))
        finished = CounterMetricFamily("dfserve_jobs_finished", "jobs that ended, by status",
                                       labels=["status"])
        for status in JobStatus:
            if status.terminal:
                finished.add_metric([status.value], stats.get(f"finished:{status.value}", 0))
        yield finished
        yield CounterMetricFamily("dfserve_frames_generated", "frames published by workers",
                                  value=stats.get("frames", 0))


class Metrics:
    """One registry per app (tests build many apps in one process)."""

    def __init__(self, get_queue: Any) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "dfserve_request_duration_seconds", "HTTP request latency (to the last byte)",
            ["method", "route", "status"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120))
        self.registry.register(QueueCollector(get_queue))

    def observe(self, method: str, route: str, status: int, started: float) -> None:
        self.latency.labels(method, route, str(status)).observe(time.perf_counter() - started)

    def render(self) -> bytes:
        return generate_latest(self.registry)
