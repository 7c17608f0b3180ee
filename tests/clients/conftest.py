"""One real `dfserve serve` process (embedded queue, tiny random bundle) shared by the client
and web tests: max_batch 1 and max_queued 1 make queueing and 429s easy to provoke, and a short
session idle timeout makes idle sessions end within a test."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Proc, dfserve_cmd, free_port, wait_ready

SESSION_IDLE_S = 6


@dataclass
class Server:
    url: str
    proc: Proc

    def cancel_all(self) -> None:
        """Cancel whatever a test left running, so the next one gets the batch slot."""
        worker = httpx.get(f"{self.url}/readyz", timeout=10).json()["workers"]
        for w in worker:
            for job_id in w.get("jobs", []):
                httpx.delete(f"{self.url}/v1/rollouts/{job_id}", timeout=10)


@pytest.fixture(scope="session")
def server(tiny_bundle_dir: Path) -> Iterator[Server]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = Proc(dfserve_cmd("serve", "--host", "127.0.0.1", "--port", str(port), "--model",
                            str(tiny_bundle_dir), "--max-batch", "1"),
                {"DFSERVE_MAX_QUEUED": "1", "DFSERVE_SESSION_IDLE_S": str(SESSION_IDLE_S)})
    try:
        wait_ready(url, [proc])
        yield Server(url, proc)
    finally:
        code = proc.stop()
        output = proc.output()
        proc.log.close()
        assert code == 0, f"dfserve serve exited with {code}:\n{output}"
