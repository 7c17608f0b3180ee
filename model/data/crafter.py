"""Training data from the real Crafter environment (Hafner 2021, the ``crafter`` package).

Each episode runs ``crafter.Env(size=size, seed=seed)`` from its reset observation under a
random policy seeded with the same ``seed``, for ``steps`` steps or until the player dies.
Alignment (DESIGN §3): frames[0] is the reset observation and actions[0] = -1; actions[i]
is the action that turned frames[i-1] into frames[i]. So an episode replays exactly:
``env = make_env(seed)``, ``env.reset()`` renders frames[0], then ``env.step(actions[i])``
renders frames[i]. ``make_env`` is ``crafter.Env(size=size, seed=seed)`` with one fix: stock
crafter is not reproducible (see ``DeterministicEnv``).

Episode k of ``generate_dataset`` uses seed ``seed_start + k``. Held-out data is another
call with a disjoint seed range, by convention starting at ``HELDOUT_SEED_START``.

Crafter's own cost sets the pace: world generation in ``reset`` (pure-Python simplex noise)
takes about a second, a step about 2 ms, so longer episodes amortise the reset. A random
policy rarely survives the first night (zombies, from about step 150): with the default 256
steps most episodes end in death, about 185 frames on average.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import crafter
import crafter.constants
import numpy as np
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from dfserve.model.data.shards import (
    META_FILE,
    NO_ACTION,
    SHARD_PATTERN,
    Episode,
    write_meta,
    write_shard,
)

log = logging.getLogger(__name__)

CRAFTER_ACTIONS: tuple[str, ...] = tuple(crafter.constants.actions)  # 17, the env's order
# Crafter draws its 9x9 view (9x7 world tiles over a 9x2 inventory) as square tiles of
# size // 9 pixels. At 72 a tile is exactly 8 px, so 8-px patches are tiles and a player step
# scrolls the world by exactly one patch; at 64 a tile is 7 px and patches straddle tiles.
RESOLUTION = 72
HELDOUT_SEED_START = 1_000_000  # held-out episodes: seeds from here on; training: 0, 1, ...
MOVES = ("move_left", "move_right", "move_up", "move_down")


def _default_weights() -> dict[str, float]:
    # Movement-heavy so the agent travels and the data covers the world (and scrolling, the
    # most common visual change); "do" next (collecting, attacking); every other action
    # rarely but never zero, so the model sees each action's effect. Sums to 1.
    w = {name: 0.16 for name in MOVES}  # 64% of steps move
    w |= {"do": 0.16, "noop": 0.05, "sleep": 0.01}
    w |= {name: 0.02 for name in CRAFTER_ACTIONS if name.startswith("place_")}  # 4 × 2%
    w |= {name: 0.01 for name in CRAFTER_ACTIONS if name.startswith("make_")}  # 6 × 1%
    return {name: w[name] for name in CRAFTER_ACTIONS}  # in action-id order


@dataclass(frozen=True)
class RandomRunPolicy:
    """Open-loop random policy: pick an action by weight, repeat it a geometric run length.

    Run lengths do not depend on the action, so the share of steps of an action equals its
    weight. The policy ignores observations, so the action sequence is a function of the
    seed alone.
    """

    weights: dict[str, float] = field(default_factory=_default_weights)  # name -> weight
    mean_run: float = 3.5  # mean of the geometric run length (>= 1)

    def __post_init__(self) -> None:
        if set(self.weights) != set(CRAFTER_ACTIONS) or min(self.weights.values()) <= 0:
            raise ValueError(f"weights must give every action of {CRAFTER_ACTIONS} a weight > 0")
        if self.mean_run < 1:
            raise ValueError(f"mean_run must be >= 1, got {self.mean_run}")

    @property
    def probs(self) -> np.ndarray:
        p = np.array([self.weights[a] for a in CRAFTER_ACTIONS], dtype=np.float64)
        probs: np.ndarray = p / p.sum()  # numpy types an ndarray's sum (a scalar) as Any
        return probs

    def actions(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n action ids (int64), runs of one action with geometric lengths."""
        out = np.empty(n, dtype=np.int64)
        i, probs = 0, self.probs
        while i < n:
            run = int(rng.geometric(1.0 / self.mean_run))
            out[i : i + run] = rng.choice(len(CRAFTER_ACTIONS), p=probs)
            i += run
        return out

    def describe(self) -> dict[str, Any]:
        moves = sum(self.weights[m] for m in MOVES) / sum(self.weights.values())
        return {"name": "random_runs", **asdict(self), "move_fraction": round(moves, 6),
                "run_length": "geometric"}


class DeterministicEnv(crafter.Env):  # type: ignore[misc]  # crafter ships no type hints
    """crafter.Env made reproducible: same seed and actions give the same frames.

    Crafter 1.8.3 keeps each chunk's objects in a ``set`` hashed by memory address, and
    ``_balance_object`` despawns ``creatures[random.randint(len)]`` in that set's order, so
    which zombie/cow/skeleton disappears (and everything after) varies from run to run and
    process to process (danijar/crafter#31, #36). We hand it the same objects sorted by
    position (unique per object) instead; the rest is crafter's own code, untouched.
    Note: ``render()`` draws night noise from the world's RNG, so extra render calls change
    the dynamics; replay only through ``step``.
    """

    def _balance_object(self, chunk: Any, objs: Any, *args: Any, **kwargs: Any) -> None:
        ordered = sorted(objs, key=lambda o: (int(o.pos[0]), int(o.pos[1])))
        super()._balance_object(chunk, ordered, *args, **kwargs)


def make_env(seed: int, size: int = RESOLUTION) -> DeterministicEnv:
    """The environment of an episode; replaying its actions reproduces its frames."""
    # length=None: episodes end at `steps` or at death, never at crafter's 10,000-step limit
    # (the length does not change the dynamics).
    return DeterministicEnv(size=size, seed=seed, length=None)


def run_episode(
    seed: int, steps: int = 256, policy: RandomRunPolicy | None = None, size: int = RESOLUTION
) -> Episode:
    """One episode: reset, then up to ``steps`` policy actions; stops early at death."""
    policy = policy or RandomRunPolicy()
    planned = policy.actions(np.random.default_rng(seed), steps)
    env = make_env(seed, size)
    frames = np.empty((steps + 1, size, size, 3), dtype=np.uint8)  # (L+1, H, W, C)
    actions = np.full(steps + 1, NO_ACTION, dtype=np.int64)
    frames[0] = env.reset()
    n, died = steps, False
    for i in range(1, steps + 1):
        obs, _, done, _ = env.step(int(planned[i - 1]))
        frames[i], actions[i] = obs, planned[i - 1]
        if done:  # crafter's done with length=None means the player died
            n, died = i, True
            break
    if died:  # copy: don't keep the unused tail of the buffers alive
        frames, actions = frames[: n + 1].copy(), actions[: n + 1].copy()
    return Episode(frames, actions, seed, died)


def _episode_job(job: tuple[int, int, int]) -> Episode:  # top level: picklable for spawn
    seed, steps, size = job
    return run_episode(seed, steps, size=size)


def _episodes(seeds: range, steps: int, workers: int, size: int) -> Iterator[Episode]:
    jobs = [(s, steps, size) for s in seeds]
    if workers == 1:
        yield from map(_episode_job, jobs)
        return
    # spawn: no fork of a parent that may hold torch/CUDA state (DESIGN §6). imap keeps the
    # seed order, so the result is identical to workers=1.
    with mp.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_episode_job, jobs, chunksize=1)


def generate_dataset(
    out_dir: str | Path,
    episodes: int,
    steps: int = 256,
    seed_start: int = 0,
    workers: int = 2,
    shard_episodes: int = 32,
    progress: bool = True,
    size: int = RESOLUTION,
) -> Path:
    """Run ``episodes`` Crafter episodes (seeds seed_start, seed_start+1, ...) into shards.

    Writes ``shard_00000.npz``, ... of ``shard_episodes`` episodes each and then
    ``meta.json`` (model.data.shards has the format). Returns the folder.
    """
    for name, value, low in [("episodes", episodes, 1), ("steps", steps, 1),
                             ("workers", workers, 1), ("shard_episodes", shard_episodes, 1),
                             ("seed_start", seed_start, 0), ("size", size, 9)]:
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / META_FILE).exists() or any(out.glob("shard_*.npz")):
        raise ValueError(f"{out} already holds a dataset; choose an empty folder")

    policy = RandomRunPolicy()
    seeds = range(seed_start, seed_start + episodes)
    shards: list[str] = []
    pending: list[Episode] = []
    n_frames = deaths = 0

    def flush() -> None:
        shards.append(SHARD_PATTERN.format(len(shards)))
        write_shard(out / shards[-1], pending)
        pending.clear()

    columns = (TextColumn("crafter"), BarColumn(), MofNCompleteColumn(), TextColumn("episodes"),
               TextColumn("{task.fields[frames]} frames"), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("crafter", total=episodes, frames=0)
        for ep in _episodes(seeds, steps, min(workers, episodes), size):
            pending.append(ep)
            n_frames += len(ep)
            deaths += ep.died
            bar.update(task, advance=1, frames=n_frames)
            if len(pending) == shard_episodes:
                flush()
        if pending:
            flush()

    write_meta(out, {
        "env": "crafter",
        "env_version": version("crafter"),
        "resolution": [size, size],
        "channels": 3,
        "action_names": list(CRAFTER_ACTIONS),
        "alignment": "actions[i] produced frames[i] from frames[i-1]; actions[0] = -1 (reset)",
        "steps": steps,
        "seed_start": seed_start,
        "seed_end": seed_start + episodes,  # exclusive
        "episodes": episodes,
        "frames": n_frames,
        "deaths": deaths,
        "shard_episodes": shard_episodes,
        "shards": shards,
        "policy": policy.describe(),
    })
    log.info("wrote %d episodes, %d frames to %s", episodes, n_frames, out)
    return out
