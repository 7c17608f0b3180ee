"""The worker's output stage: frames to PNG to Redis, and each rollout's MP4, off the stepping
thread, so codec and network time never hold up the next denoising row of any rollout.

The stepping thread hands over one `Tick` per denoising row: the frames that became clean (of
every rollout) and the rollouts that are complete. One publishing thread takes ticks in order
and, per tick:
    PNG-encodes its frames on a small pool -> publishes them all in one Redis pipeline
    (queue.publish_frames) -> feeds each rollout's MP4 encoder (media.mp4_encoder) -> finishes
    the complete rollouts (flush the encoder, store the MP4, `done`).
So a job's frames reach Redis in index order and its `done` after its last frame, and an MP4
is finished one flush after its last frame instead of one pass over all of them at the end.

At most `max_pending` ticks wait: a slow Redis or codec slows stepping down instead of growing
memory. A Redis error stops publishing until the stepping thread has seen it (`raise_error`,
at its next tick) and dropped its live jobs (`reset`); their stream entries stay pending and
are re-run after the lease, as when the stepping thread itself loses Redis.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import redis

from dfserve.model.media import VideoEncoder, mp4_encoder
from dfserve.server import video
from dfserve.server.queue import ClaimedJob, JobStatus, Queue

log = logging.getLogger(__name__)

PNG_THREADS = 2  # the pool that encodes a tick's frames (zlib and libpng release the GIL)
MAX_PENDING_TICKS = 8


@dataclass
class Frame:
    job: ClaimedJob
    index: int
    pixels: np.ndarray  # uint8 (R, R, 3)


@dataclass
class Tick:
    """What one denoising row produced."""

    frames: list[Frame] = field(default_factory=list)
    complete: list[ClaimedJob] = field(default_factory=list)  # rollouts whose frames are all in


class Publisher:
    def __init__(self, queue_: Queue, max_pending: int = MAX_PENDING_TICKS) -> None:
        self.queue = queue_
        self._ticks: queue.Queue[Tick | None] = queue.Queue(max_pending)
        self._videos: dict[str, VideoEncoder] = {}  # job id -> its MP4 so far
        self._videos_lock = threading.Lock()  # the stepping thread opens and forgets videos
        self._error: Exception | None = None
        self._pool = ThreadPoolExecutor(PNG_THREADS, thread_name_prefix="png")
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._thread.start()

    # --------------------------------------------------------------- the stepping thread

    def open_video(self, job: ClaimedJob, fps: int) -> None:
        """The job's frames also go into an MP4, finished when the job is complete."""
        with self._videos_lock:
            self._videos[job.id] = mp4_encoder(fps)

    def forget(self, job_id: str) -> None:
        """The job left the batch unfinished (failed, cancelled, lost): drop its MP4."""
        with self._videos_lock:
            encoder = self._videos.pop(job_id, None)
        if encoder is not None:
            encoder.close()

    @property
    def videos(self) -> frozenset[str]:
        """The jobs whose MP4 is being made."""
        with self._videos_lock:
            return frozenset(self._videos)

    def submit(self, tick: Tick) -> None:
        """Queue a tick; blocks while max_pending ticks wait (back-pressure)."""
        if tick.frames or tick.complete:
            self._ticks.put(tick)

    def flush(self) -> None:
        """Wait until every submitted tick is published (or dropped after a Redis error)."""
        self._ticks.join()

    def raise_error(self) -> None:
        """Raise the Redis error that stopped publishing, if any."""
        if self._error is not None:
            raise self._error

    def reset(self) -> None:
        """After a Redis error: forget every video and publish again from the next tick. The
        ticks that were waiting belong to the jobs the stepping thread has just dropped."""
        self.flush()
        for job_id in list(self._videos):
            self.forget(job_id)
        self._error = None

    def close(self) -> None:
        """Publish what is queued, then stop the thread and the pool."""
        self.flush()
        self._ticks.put(None)
        self._thread.join()
        self._pool.shutdown()
        for job_id in list(self._videos):
            self.forget(job_id)

    # --------------------------------------------------------------- the publishing thread

    def _run(self) -> None:
        while (tick := self._ticks.get()) is not None:
            try:
                if self._error is None:  # after an error, ticks are dropped until reset
                    self._publish(tick)
            except (redis.ConnectionError, redis.TimeoutError) as e:
                log.warning("Redis unreachable while publishing (%s)", e)
                self._error = e
            except Exception:  # noqa: BLE001 - a bug here must not stop every later tick
                log.exception("publishing a tick failed")
            finally:
                self._ticks.task_done()
        self._ticks.task_done()

    def _publish(self, tick: Tick) -> None:
        pngs = self._pool.map(video.encode_png, [f.pixels for f in tick.frames])
        published = self.queue.publish_frames([(f.job.id, f.index, png)
                                               for f, png in zip(tick.frames, pngs, strict=True)])
        if not all(published):  # a re-run after a crash: frames the first run published
            log.info("%d frames were published before", published.count(False))
        for frame in tick.frames:  # into the MP4 all the same: the re-run makes the same ones
            self._add_to_video(frame)
        for job in tick.complete:
            self._finish(job)

    def _add_to_video(self, frame: Frame) -> None:
        with self._videos_lock:
            encoder = self._videos.get(frame.job.id)
        if encoder is not None:
            encoder.add(frame.pixels)

    def _finish(self, job: ClaimedJob) -> None:
        with self._videos_lock:
            encoder = self._videos.pop(job.id, None)
        if encoder is None:  # forgotten meanwhile (reset): the job is re-run elsewhere
            return
        try:
            mp4 = encoder.finish()
        except Exception as e:  # noqa: BLE001 - this job fails, not the worker
            log.warning("job %s: the MP4 failed: %s", job.id, e)
            self.queue.finish(job, JobStatus.failed, error=f"{type(e).__name__}: {e}")
            return
        finally:
            encoder.close()
        self.queue.finish(job, JobStatus.succeeded, video=mp4)
