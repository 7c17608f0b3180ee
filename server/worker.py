"""The worker: claim jobs, step every live rollout together, publish frames as they are clean.

One iteration of `Worker.tick` (vLLM's `step`, arq's poll iteration):
    claim up to batch_limit - live jobs (max_batch, or fewer when the memory budget says so;
    blocking briefly only when idle) -> start them ->
    one `engine.step(states)` for all live rollouts (one denoising row each; new jobs joined
    between rows, finished ones leave: continuous batching) -> hand the row's clean frames and
    the done rollouts to the publisher (server/publisher.py: PNGs, one Redis pipeline, the
    MP4s, on its own thread) -> drop cancelled ones -> renew leases + heartbeat.

Interactive sessions (WS /v1/sessions) are long-lived jobs in the same batch: the worker keeps
their RolloutState alive between actions, reads new actions between rows (`feed_sessions`:
`engine.extend`, so with chunk_size 1 the frames equal an all-up-front rollout), and ends
them when cancelled (the client left) or idle for settings.session_idle_s.

A job that raises while being prepared or stepped fails alone; the others go on. On SIGTERM,
SIGINT or `stop`, live jobs are released back to the queue (another worker re-runs them from
the stored seed; frames already published are not published twice) and the worker exits.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field, replace

import numpy as np
import redis
import torch

from dfserve.model.bundle import Bundle, load_bundle
from dfserve.model.errors import FieldError
from dfserve.model.request import default_action, prepare
from dfserve.model.rollout import RolloutEngine, RolloutRequest, RolloutState
from dfserve.server import video
from dfserve.server.jobs import JobSpec
from dfserve.server.publisher import Frame, Publisher, Tick
from dfserve.server.queue import ClaimedJob, JobStatus, Queue
from dfserve.server.settings import Settings

log = logging.getLogger(__name__)

IDLE_BLOCK_MS = 500  # how long an idle worker waits for a job (and so how fast it stops)
REDIS_BACKOFF_S = (0.1, 5.0)  # first and longest wait between retries while Redis is down
SESSION_POLL_MS = 20  # how long a worker with only waiting sessions waits for their actions
# New jobs join the batch between chunks (Worker.may_admit), but never wait more rows than this
# for every live rollout to reach one (a long schedule would keep them out).
ADMIT_WAIT_ROWS = 16


@dataclass
class Session:
    """What an interactive session carries besides its rollout state."""

    template: RolloutRequest  # context, sampling, seed; the actions come from the action stream
    cursor: str = "0-0"  # the last action-stream entry read
    last_active: float = field(default_factory=time.monotonic)


@dataclass
class Live:
    """A rollout (or an interactive session) in this worker's batch."""

    job: ClaimedJob
    state: RolloutState | None  # None: a session that has had no action yet
    fps: int
    session: Session | None = None


class Worker:
    def __init__(self, settings: Settings, queue: Queue, bundle: Bundle,
                 stop: threading.Event | None = None) -> None:
        self.settings, self.queue, self.bundle = settings, queue, bundle
        self.name = settings.resolved_worker_name()
        self.device = settings.resolved_device()
        self.engine = RolloutEngine(bundle, self.device)
        self.publisher = Publisher(queue)
        # Batch size bounded by memory, not only by a constant (continuous batching, vLLM).
        budget = settings.resolved_memory_budget(self.device)
        self.batch_limit = min(settings.max_batch, self.engine.max_batch_for(budget))
        self.stop = stop or threading.Event()
        self.live: list[Live] = []
        self.warmed_up = False
        self._next_renew = 0.0
        self._rows_waited = 0  # rows stepped since new jobs were last let in
        # Renew well inside the lease and the heartbeat well inside its TTL.
        self._renew_every = min(settings.lease_ms / 1000 / 3, settings.heartbeat_ttl_s / 3)

    # ------------------------------------------------------------------------- the loop

    def run(self) -> None:
        self.warm_up()
        log.info("worker %s ready: model %s on %s, batch up to %d", self.name, self.bundle.name,
                 self.device, self.batch_limit)
        backoff = 0.0
        try:
            while not self.stop.is_set():
                try:
                    self.tick()
                    backoff = 0.0
                except (redis.ConnectionError, redis.TimeoutError) as e:
                    backoff = min(max(2 * backoff, REDIS_BACKOFF_S[0]), REDIS_BACKOFF_S[1])
                    self.redis_lost(e, backoff)
                    self.stop.wait(backoff)
        finally:
            self.shutdown()

    def redis_lost(self, error: Exception, backoff: float) -> None:
        """Redis went away mid-tick: a frame may have been lost between step and publish, so
        drop the live jobs; their stream entries stay pending and are re-run from their seed
        after the lease (by any worker; frames already published are not sent twice)."""
        if self.live:
            log.warning("Redis unreachable (%s): dropping %d live jobs, re-run after the "
                        "lease", error, len(self.live))  # fmt: skip
            self.live = []
        else:
            log.warning("Redis unreachable (%s): retrying in %.1fs", error, backoff)
        self.publisher.reset()
        self._next_renew = 0.0  # heartbeat as soon as it is back

    def tick(self) -> None:
        self.publisher.raise_error()  # the publishing thread lost Redis: handle it here
        free = self.batch_limit - len(self.live)
        if free > 0 and self.may_admit():
            claimed = self.queue.claim(self.name, free, 0 if self.live else IDLE_BLOCK_MS)
            self.live += [live for job in claimed if (live := self.admit(job))]
        if any(live.session for live in self.live):
            self.feed_sessions()
        if self.live:
            self.step()
            self.drop_cancelled()
        if time.monotonic() >= self._next_renew:
            self.renew()

    # ------------------------------------------------------------------------- the parts

    def may_admit(self) -> bool:
        """Whether to claim new jobs this tick: when every stepping rollout is between chunks,
        or after ADMIT_WAIT_ROWS rows. Rollouts in different phases of their chunks need
        forwards of different sizes, which run apart (RolloutEngine._run_forwards): 8 rollouts
        started one row apart made 20% fewer frames/s than 8 started together (the 72-px
        crafter-cpu, one thread). A job waits in the stream meanwhile, at most a chunk."""
        stepping = [live.state for live in self.live
                    if live.state is not None and not live.state.done]  # fmt: skip
        if self._rows_waited >= ADMIT_WAIT_ROWS or all(map(self.engine.between_chunks,
                                                           stepping)):
            self._rows_waited = 0
            return True
        self._rows_waited += 1
        return False

    def admit(self, job: ClaimedJob) -> Live | None:
        """Start the job: its JobSpec, as the API stored it, becomes a live rollout."""
        if not self.queue.start(job, self.name):
            return None
        try:
            live = self.live_job(job, JobSpec.from_params(job.params))
        except Exception as e:  # noqa: BLE001 - one bad job must not take the worker down
            self.fail(job, e)
            return None
        log.info("job %s started (%d frames, batch %d)", job.id, job.frames_total,
                 len(self.live) + 1)
        return live

    def live_job(self, job: ClaimedJob, spec: JobSpec) -> Live:
        """The job's rollout, started; a session's is checked now and started by its first
        action (feed_sessions)."""
        if spec.model != self.bundle.name:
            raise FieldError("model", f"this worker serves {self.bundle.name!r}, "
                             f"not {spec.model!r}")
        config = self.bundle.config
        if spec.kind == "session":
            template = spec.request(config)
            self.engine.validate(replace(template, actions=(default_action(config),)))
            return Live(job, None, spec.fps, session=Session(template))
        live = Live(job, self.engine.start(spec.request(config)), spec.fps)
        self.publisher.open_video(job, spec.fps)
        return live

    def step(self) -> None:
        """One denoising row for every live rollout, in one batched forward."""
        stepping = [(live, live.state) for live in self.live
                    if live.state is not None and not live.state.done]  # not waiting sessions
        if not stepping:
            return
        try:
            outputs = self.engine.step([state for _, state in stepping])
        except Exception:  # noqa: BLE001 - find the culprit: step each rollout alone
            log.exception("batched step failed; stepping rollouts one by one")
            outputs = []
            for live, state in list(stepping):
                try:
                    outputs.append(self.engine.step([state])[0])
                except Exception as e:  # noqa: BLE001
                    stepping.remove((live, state))
                    self.live.remove(live)
                    self.fail(live.job, e)
        tick = Tick()
        for (live, state), frames in zip(stepping, outputs, strict=True):
            # (C, R, R) in [-1, 1] -> (R, R, 3) uint8; the publisher encodes them
            tick.frames += [Frame(live.job, index, video.frames_to_uint8(x))
                            for index, x in frames]  # fmt: skip
            if state.done and live.session is None:
                self.live.remove(live)
                tick.complete.append(live.job)
        self.publisher.submit(tick)

    def feed_sessions(self) -> None:
        """Hand new actions to the live sessions (waiting up to SESSION_POLL_MS for some when
        nothing else can step) and end the sessions idle for settings.session_idle_s."""
        sessions = [(live, live.session) for live in self.live if live.session is not None]
        busy = any(live.state is not None and not live.state.done for live in self.live)
        new = self.queue.read_actions({live.job.id: s.cursor for live, s in sessions},
                                      0 if busy else SESSION_POLL_MS)
        now = time.monotonic()
        for live, s in sessions:
            if live.job.id in new:
                actions, s.cursor = new[live.job.id]
                s.last_active = now
                try:
                    if live.state is None:
                        live.state = self.engine.start(replace(s.template,
                                                               actions=tuple(actions)))
                    else:
                        self.engine.extend(live.state, actions)
                except Exception as e:  # noqa: BLE001
                    self.live.remove(live)
                    self.fail(live.job, e)
            elif live.state is not None and not live.state.done:
                s.last_active = now  # generating is activity
            elif now - s.last_active > self.settings.session_idle_s:
                self.live.remove(live)
                self.queue.finish(live.job, JobStatus.cancelled, error=(
                    f"session: idle for more than {self.settings.session_idle_s:g} s"))

    def drop_cancelled(self) -> None:
        cancelled = self.queue.cancelled(live.job.id for live in self.live)
        for live in [x for x in self.live if x.job.id in cancelled]:
            self.live.remove(live)
            self.publisher.forget(live.job.id)
            self.queue.finish(live.job, JobStatus.cancelled)

    def fail(self, job: ClaimedJob, error: Exception) -> None:
        self.publisher.forget(job.id)
        log.warning("job %s failed: %s", job.id, error, exc_info=not isinstance(error,
                                                                               ValueError))
        self.queue.finish(job, JobStatus.failed, error=f"{type(error).__name__}: {error}"
                          if not isinstance(error, ValueError) else str(error))

    def renew(self) -> None:
        lost = set(self.queue.renew(self.name, [live.job for live in self.live]))
        if lost:
            log.warning("lost the lease of %s: dropping them", sorted(lost))
            self.live = [live for live in self.live if live.job.id not in lost]
            for job_id in lost:
                self.publisher.forget(job_id)
        self.heartbeat()
        self._next_renew = time.monotonic() + self._renew_every

    def heartbeat(self) -> None:
        self.queue.heartbeat(self.name, {
            "warmed_up": self.warmed_up, "host": socket.gethostname(), "pid": os.getpid(),
            "model": self.bundle.name, "device": self.device,
            "dtype": str(self.engine.net_dtype).removeprefix("torch."), "live": len(self.live),
            "jobs": [live.job.id for live in self.live], "max_batch": self.batch_limit,
        }, self.settings.heartbeat_ttl_s)  # fmt: skip

    def warm_up(self) -> None:
        """A short rollout before the first heartbeat that says warmed_up (allocations, kernels)."""
        self.heartbeat_if_reachable()  # visible, not ready yet
        t0 = time.perf_counter()
        cfg = self.bundle.config
        r = cfg.network.resolution
        context = np.zeros((cfg.data.context_length, r, r, 3), np.uint8)
        request = prepare(cfg, context, frames=cfg.sampling.chunk_size + 1).request
        for _ in self.engine.rollout(request):
            pass
        self.warmed_up = True
        self.heartbeat_if_reachable()
        log.info("worker %s warmed up in %.2fs", self.name, time.perf_counter() - t0)

    def heartbeat_if_reachable(self) -> None:
        try:
            self.heartbeat()
        except (redis.ConnectionError, redis.TimeoutError) as e:  # the loop will retry
            log.warning("Redis unreachable (%s): no heartbeat yet", e)

    def shutdown(self) -> None:
        self.publisher.close()  # what was made is published before the jobs are released
        try:
            if self.live:
                log.info("stopping: releasing %d live jobs", len(self.live))
                self.queue.release(self.name, [live.job for live in self.live])
                self.live = []
            self.queue.forget_worker(self.name)
        except (redis.ConnectionError, redis.TimeoutError) as e:  # leases run out instead
            log.warning("Redis unreachable at shutdown (%s): live jobs are re-run after "
                        "their lease", e)  # fmt: skip
        log.info("worker %s stopped", self.name)


def build_worker(settings: Settings, queue: Queue, stop: threading.Event | None = None) -> Worker:
    if settings.torch_threads:  # process-wide: also the embedded API's threads
        torch.set_num_threads(settings.torch_threads)
    _, path = settings.default_model()
    bundle = load_bundle(path, getattr(torch, settings.resolved_dtype()))
    return Worker(settings, queue, bundle, stop)


def run_worker(settings: Settings) -> None:
    """`dfserve worker`: one worker process against settings.redis_url, until SIGTERM/SIGINT."""
    if not settings.redis_url:
        raise ValueError("redis_url: `dfserve worker` needs DFSERVE_REDIS_URL "
                         "(use `dfserve serve` for the all-in-one embedded mode)")  # fmt: skip
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    queue = Queue(settings.redis_client(), **settings.queue_options())
    build_worker(settings, queue, stop).run()
