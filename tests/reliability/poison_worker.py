"""`dfserve worker` with a poison job, for tests/reliability/test_crash.py: the real worker
process, except that it dies (os._exit(1), no release, no goodbye) right after it marks a job
with the poison seed started, as a job that crashes the interpreter would. The fault is
injected here, in the test's own entry point, so production code carries no test hook.

    python -m tests.reliability.poison_worker SEED worker --model DIR ...
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from dfserve.server.cli import main
from dfserve.server.queue import ClaimedJob, Queue

log = logging.getLogger("tests.poison_worker")


def die_on_seed(poison: int) -> None:
    """Wrap Queue.start, which the worker calls as it admits a claimed job."""
    start = Queue.start

    def start_or_die(self: Queue, job: ClaimedJob, worker: str) -> Any:
        started = start(self, job, worker)
        if started and job.params.get("seed") == poison:
            log.critical("TEST ONLY: job %s has the poison seed %d: exiting", job.id, poison)
            os._exit(1)  # the process dies; the job's lease runs out
        return started

    Queue.start = start_or_die  # type: ignore[method-assign]


if __name__ == "__main__":
    die_on_seed(int(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
