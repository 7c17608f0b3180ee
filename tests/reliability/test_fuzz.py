"""Schemathesis against the app's own OpenAPI schema (embedded queue, in-process ASGI):
thousands of generated requests, valid and invalid by the schema, over every operation;
none may answer 5xx (bad input is always a 4xx naming the field)."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import fakeredis
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from dfserve.server.app import create_app
from dfserve.server.queue import Queue
from dfserve.server.settings import Settings

EXAMPLES = 200  # per operation and generation mode (over 3,000 requests in all)
MIN_TOTAL = 2000


def test_fuzz_every_operation_no_5xx(tiny_bundle_dir: Path) -> None:
    s = Settings(model=str(tiny_bundle_dir), redis_prefix=f"fuzz-{uuid.uuid4().hex[:8]}",
                 max_queued=50, max_body_bytes=256 * 1024, wait_timeout_s=0.2)
    queue = Queue(fakeredis.FakeRedis(server=fakeredis.FakeServer()), **s.queue_options())
    queue.heartbeat("fuzz:1", {"warmed_up": True}, ttl_s=3600)  # so /readyz is 200, not 503
    app = create_app(s, queue)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    calls: Counter[str] = Counter()
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9, [op.label for op in operations]
    def check(case: schemathesis.Case, label: str) -> None:
        calls[label] += 1
        try:
            response = case.call()
        except Exception as e:  # noqa: BLE001 - an unhandled server error is a 500
            failures.append(f"{type(e).__name__}: {e} {label}: {case.as_curl_command()}")
            return
        if response.status_code >= 500:
            failures.append(f"{response.status_code} {label}: {case.as_curl_command()}"
                            f"\n{response.text[:300]}")

    def checker(label: str) -> Callable[[schemathesis.Case], None]:
        def run(case: schemathesis.Case) -> None:
            check(case, label)

        return run

    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz = given(case=op.as_strategy(generation_mode=mode))(
                settings(max_examples=EXAMPLES, deadline=None, database=None,
                         derandomize=True, suppress_health_check=list(HealthCheck),
                         phases=[Phase.generate])(checker(op.label)))
            try:
                fuzz()
            except Unsatisfiable:  # nothing to make invalid (an operation without inputs)
                assert mode is GenerationMode.NEGATIVE, op.label
    total = sum(calls.values())
    assert not failures, f"{len(failures)} 5xx answers:\n" + "\n".join(failures[:10])
    assert total >= MIN_TOTAL, calls
    print(f"fuzz: {total} requests over {len(calls)} operations, 0 5xx: {dict(calls)}")
