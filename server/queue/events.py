"""Each job's event stream: the worker publishes frames into it, readers replay it from any
point (WebSocket clients resume; frames come from Redis, not from the worker's memory). Its
ids follow the scheme in keys.py, which makes publishing a frame at most once atomic."""

from __future__ import annotations

from collections.abc import Sequence

import redis

from dfserve.server.queue.keys import MAX_INDEX, events_cursor, frame_id
from dfserve.server.queue.records import Event, parse_event, text
from dfserve.server.queue.store import Store


class EventStreams(Store):
    """Publishing frames and reading events."""

    def publish_frame(self, job_id: str, index: int, png: bytes) -> bool:
        """Append frame `index` (0 <= index < frames_total); False if it was already published
        (a re-run) or the job is over. Atomic by the event-id scheme (see keys.py)."""
        return self.publish_frames([(job_id, index, png)])[0]

    def publish_frames(self, frames: Sequence[tuple[str, int, bytes]]) -> list[bool]:
        """publish_frame for many frames (job id, index, PNG) in two round trips: the worker
        publishes a whole tick's frames, of every rollout, at once. A job's frames must come
        in index order."""
        for _, index, _ in frames:
            if index < 0:
                raise ValueError(f"frame index must be >= 0, got {index}")
        pipe = self.redis.pipeline(transaction=False)
        for job_id, index, png in frames:
            pipe.xadd(self.keys.events(job_id), {"type": "frame", "index": index, "png": png},
                      id=frame_id(index))
        added = [_added(reply) for reply in pipe.execute(raise_on_error=False)]
        # Not atomic with the XADDs; only two workers racing on one job (a stale lease) could
        # write it out of order, and the next frame corrects it. The stream is the truth.
        done = {job_id: index + 1 for (job_id, index, _), ok in zip(frames, added, strict=True)
                if ok}  # the last published index of each job, as frames come in order
        if done:
            pipe = self.redis.pipeline(transaction=False)
            for job_id, frames_done in done.items():
                pipe.hset(self.keys.job(job_id), "frames_done", frames_done)
            pipe.hincrby(self.keys.stats, "frames", sum(added))
            pipe.execute()
        return added

    def events(self, job_id: str, after_index: int = -1, block_ms: int = 0,
               after_id: str | None = None, count: int | None = None) -> list[Event]:
        """Frames with index > after_index, and the control events after them, in order.

        A client that saw frames up to k resumes with after_index=k and gets every later frame
        exactly once, then `done`. A polling loop should pass `after_id` = the last event's id
        instead, so control events after the last frame are not repeated. With block_ms > 0
        and nothing new, waits up to block_ms for the next event (XREAD BLOCK).
        """
        start = after_id or events_cursor(after_index)
        key = self.keys.events(job_id)
        entries = self.redis.xrange(key, f"({start}", "+", count=count)
        if not entries and block_ms > 0:
            reply = self.redis.xread({key: start}, count=count, block=block_ms)
            entries = reply[0][1] if reply else []
        return [parse_event(eid, f) for eid, f in entries]

    def newest_events(self, cursors: dict[str, str], block_ms: int) -> dict[str, str]:
        """Job id -> the id of an event after its cursor, for the jobs that have one; with
        none, waits up to block_ms (one XREAD over every job). COUNT 1: this is a wake-up for
        the API's event hub (server/streams.py), not the frames, which readers fetch with
        `events` from their own cursors."""
        if not cursors:
            return {}
        streams = {self.keys.events(j): c for j, c in cursors.items()}
        reply = self.redis.xread(streams, count=1, block=max(block_ms, 1))
        prefix = len(self.keys.events(""))
        return {text(key)[prefix:]: text(entries[-1][0]) for key, entries in reply or []
                if entries}

    def frame_png(self, job_id: str, index: int) -> bytes | None:
        """The PNG of one published frame."""
        eid = frame_id(index)
        entries = (self.redis.xrange(self.keys.events(job_id), eid, eid)
                   if 0 <= index <= MAX_INDEX else [])
        return entries[0][1].get(b"png") if entries else None


def _added(reply: object) -> bool:
    """An XADD's reply: True when it appended; False when the id was taken (the frame was
    published before, or the job is over: see keys.py). Any other error is raised."""
    if isinstance(reply, redis.ResponseError):
        if "equal or smaller" not in str(reply):
            raise reply
        return False
    if isinstance(reply, Exception):
        raise reply
    return True
