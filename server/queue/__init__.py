"""All Redis knowledge of dfserve: the job queue shared by the API and the workers.

One file per concern, each a part of `Queue`:
    keys.py       the Redis layout: every key name and event-stream id
    records.py    what the queue hands out (Job, ClaimedJob, Event) and how replies decode
    store.py      the client, settings and consumer group every part shares; `connect`
    jobs.py       reading jobs: state, an owner's list, queue positions, videos
    submit.py     submitting a job, in one MULTI/EXEC
    lifecycle.py  how a job ends: finish, cancel
    leases.py     the worker's side: claim, start, renew, release, dead letters
    events.py     each job's event stream: publishing frames, replaying events
    sessions.py   interactive sessions: submission and actions
    health.py     worker heartbeats, the next free slot, counters
"""

from __future__ import annotations

from dfserve.server.queue.events import EventStreams
from dfserve.server.queue.health import Health
from dfserve.server.queue.keys import GROUP, MAX_INDEX, Keys, events_cursor, stream_id
from dfserve.server.queue.leases import DEAD_MAXLEN, Leases
from dfserve.server.queue.records import ClaimedJob, Event, Job, JobStatus
from dfserve.server.queue.sessions import Sessions
from dfserve.server.queue.store import PENDING_TTL_S, connect
from dfserve.server.queue.submit import MAX_OWNED, QueueFull

__all__ = [
    "DEAD_MAXLEN", "GROUP", "MAX_INDEX", "MAX_OWNED", "PENDING_TTL_S", "ClaimedJob", "Event",
    "Job", "JobStatus", "Keys", "Queue", "QueueFull", "connect", "events_cursor", "stream_id",
]


class Queue(Leases, Sessions, EventStreams, Health):
    """The job queue, shared by API threads and worker(s); thread-safe (no mutable state).

    Each base is one concern (see the list above), all over one `Store`; together they are
    the one object the API and the worker are given."""
