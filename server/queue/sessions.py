"""Interactive sessions (WS /v1/sessions) on the queue.

A session is a job like a rollout (params["kind"] == "session"): same stream, claim, lease,
cancel flag and event stream. It is submitted with no frames to make (frames_total 0); the
API appends actions to p:actions:{id} and raises frames_total, and the worker that holds the
session reads them between rows (`read_actions`). A re-run after a crash replays the whole
action stream from the stored seed; frames already published are refused by the event-id
scheme, so clients see each frame once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from dfserve.server.queue.records import Job, text
from dfserve.server.queue.submit import Submission


class Sessions(Submission):
    """Submitting sessions and passing their actions from the API to the worker."""

    def submit_session(self, params: dict[str, Any], owner: str | None = None) -> Job:
        """Enqueue a session job: frames_total 0 until actions arrive. Sessions are not
        listed among the owner's rollouts."""
        return self._enqueue({**params, "kind": "session"}, 0, owner, None, listed=False)

    def push_actions(self, job_id: str, actions: Sequence[int]) -> int:
        """Append actions (one frame each) to a session; returns the new frames_total."""
        key = self.keys.actions(job_id)
        pipe = self.redis.pipeline()
        pipe.xadd(key, {"a": json.dumps([int(a) for a in actions])})
        pipe.expire(key, self._pending_ttl_s)
        pipe.hincrby(self.keys.job(job_id), "frames_total", len(actions))
        return int(pipe.execute()[-1])

    def read_actions(self, cursors: dict[str, str], block_ms: int = 0
                     ) -> dict[str, tuple[list[int], str]]:
        """New actions of sessions, session id -> (actions, new cursor), for the sessions that
        have some after their cursor ("0-0" at first). With block_ms > 0 and nothing new,
        waits up to block_ms for any of them (XREAD BLOCK)."""
        if not cursors:
            return {}
        streams = {self.keys.actions(i): c for i, c in cursors.items()}
        reply = self.redis.xread(streams, block=block_ms if block_ms > 0 else None)
        out: dict[str, tuple[list[int], str]] = {}
        prefix = len(self.keys.actions(""))
        for key, entries in reply or []:
            actions = [a for _, f in entries for a in json.loads(f[b"a"])]
            out[text(key)[prefix:]] = (actions, text(entries[-1][0]))
        return out
