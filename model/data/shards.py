"""Episode storage on disk and the PyTorch views of it used for training.

A dataset is a folder of compressed ``.npz`` shards plus ``meta.json``; ``meta.json`` is
written last, so its presence marks a complete dataset. Each shard holds whole episodes:

    frames           uint8 (N, H, W, 3)  every episode's frames, concatenated
    actions          int16 (N,)          actions[i] produced frames[i] from frames[i-1];
                                         the first entry of each episode is -1 (reset frame)
    episode_starts   int64 (E,)          index of each episode's first frame in ``frames``
    episode_lengths  int64 (E,)          frames per episode (= environment steps + 1)
    episode_seeds    int64 (E,)          the seed of each episode (environment and policy)
    episode_died     bool  (E,)          the episode ended early because the player died

Frames stay uint8 in memory (a 256-step Crafter episode is 3.2 MB); conversion to float
happens per item. Dimension letters: B batch, T frames of a window, H W height width,
C channels, N frames of a shard, E episodes of a shard.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

META_FILE = "meta.json"
SHARD_PATTERN = "shard_{:05d}.npz"
FORMAT_NAME = "dfserve-episodes"
FORMAT_VERSION = 1
NO_ACTION = -1  # actions[0] of every episode: frames[0] is the reset observation


@dataclass(frozen=True, eq=False)  # eq=False: numpy arrays have no truth value
class Episode:
    """One episode: frames[0] is the reset observation, actions[i] produced frames[i]."""

    frames: np.ndarray  # uint8 (L+1, H, W, 3)
    actions: np.ndarray  # int64 (L+1,), actions[0] == NO_ACTION
    seed: int
    died: bool = False  # ended early because the player died

    def __post_init__(self) -> None:
        f, a = self.frames, self.actions
        if f.dtype != np.uint8 or f.ndim != 4 or f.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 (L+1, H, W, 3), got {f.dtype} {f.shape}")
        if a.ndim != 1 or a.shape[0] != f.shape[0]:
            raise ValueError(f"actions must have shape ({f.shape[0]},), got {a.shape}")
        if a.shape[0] == 0 or a[0] != NO_ACTION or (a[1:] < 0).any():
            raise ValueError("actions[0] must be -1 (reset frame) and actions[1:] >= 0")

    def __len__(self) -> int:
        return int(self.frames.shape[0])  # frames, not steps

    @property
    def n_steps(self) -> int:
        return len(self) - 1


# ----------------------------------------------------------------------------- writing


def _atomic(path: Path) -> Path:
    # Write next to the target and rename: a crash never leaves a truncated shard or meta.
    return path.with_name(f".{path.name}.tmp")


def write_shard(path: str | Path, episodes: Sequence[Episode]) -> None:
    """Write ``episodes`` as one compressed shard (format in the module docstring)."""
    if not episodes:
        raise ValueError("a shard needs at least one episode")
    path = Path(path)
    lengths = np.array([len(e) for e in episodes], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    tmp = _atomic(path)
    with open(tmp, "wb") as fh:
        np.savez_compressed(
            fh,
            frames=np.concatenate([e.frames for e in episodes]),  # (N, H, W, 3)
            actions=np.concatenate([e.actions for e in episodes]).astype(np.int16),
            episode_starts=starts,
            episode_lengths=lengths,
            episode_seeds=np.array([e.seed for e in episodes], dtype=np.int64),
            episode_died=np.array([e.died for e in episodes], dtype=bool),
        )
    os.replace(tmp, path)


def write_meta(directory: str | Path, meta: dict[str, Any]) -> None:
    """Write ``meta.json`` (last: it marks the dataset complete)."""
    path = Path(directory) / META_FILE
    tmp = _atomic(path)
    tmp.write_text(json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION, **meta}, indent=2))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- reading


def load_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise ValueError(f"{path} not found: {directory} is not a (complete) dataset")
    meta: dict[str, Any] = json.loads(path.read_text())
    if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format {meta.get('format')!r} v{meta.get('version')}, "
            f"expected {FORMAT_NAME!r} v{FORMAT_VERSION}"
        )
    return meta


def load_shard(path: str | Path) -> list[Episode]:
    with np.load(path, allow_pickle=False) as z:
        frames, actions = z["frames"], z["actions"].astype(np.int64)
        starts, lengths = z["episode_starts"], z["episode_lengths"]
        seeds, died = z["episode_seeds"], z["episode_died"]
    if frames.dtype != np.uint8 or frames.shape[0] != actions.shape[0]:
        raise ValueError(f"{path}: frames {frames.dtype} {frames.shape} vs actions {actions.shape}")
    frames.setflags(write=False)  # episodes share the shard's arrays: keep them immutable
    actions.setflags(write=False)
    return [
        Episode(frames[s : s + n], actions[s : s + n], int(seed), bool(d))  # views, no copies
        for s, n, seed, d in zip(starts, lengths, seeds, died, strict=True)
    ]


def load_episodes(directory: str | Path) -> list[Episode]:
    """All episodes of a dataset folder, in seed order of generation (shard by shard)."""
    meta = load_meta(directory)
    episodes = [e for name in meta["shards"] for e in load_shard(Path(directory) / name)]
    if len(episodes) != meta["episodes"]:
        raise ValueError(f"{directory}: meta.json lists {meta['episodes']} episodes, "
                         f"shards hold {len(episodes)}")
    return episodes


# ----------------------------------------------------------------------------- windows


def _window_counts(episodes: Sequence[Episode], n_frames: int, stride: int) -> np.ndarray:
    lengths = np.array([len(e) for e in episodes], dtype=np.int64)
    return np.maximum(0, (lengths - n_frames) // stride + 1)  # windows per episode


def to_model_frames(frames: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.asarray(frames, dtype=np.float32) / 127.5 - 1.0)
    return x.movedim(-1, -3).contiguous()  # (..., H, W, C) -> (..., C, H, W)


class WindowDataset(Dataset[dict[str, torch.Tensor]]):
    """Every window of ``n_frames`` consecutive frames inside one episode.

    Windows start at 0, stride, 2·stride, ... of each episode and never cross an episode
    boundary. Item: ``frames`` float32 (T, 3, H, W) in [-1, 1] and ``actions`` int64 (T,),
    where the reset frame's "no action" (-1) becomes ``null_action`` (the model's
    unconditional action id, n_actions).
    """

    def __init__(
        self,
        episodes: Sequence[Episode] | str | Path,
        n_frames: int,
        null_action: int,
        stride: int = 1,
    ) -> None:
        if n_frames < 1:
            raise ValueError(f"n_frames must be >= 1, got {n_frames}")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        if null_action < 0:
            raise ValueError(f"null_action must be >= 0 (an action id), got {null_action}")
        if isinstance(episodes, str | Path):
            episodes = load_episodes(episodes)
        self.episodes = list(episodes)
        self.n_frames, self.stride, self.null_action = n_frames, stride, null_action
        counts = _window_counts(self.episodes, n_frames, stride)
        if counts.sum() == 0:
            raise ValueError(f"no episode has {n_frames} frames: no windows")
        # (episode, start) per window, two compact int arrays instead of a list of tuples
        self._episode = np.repeat(np.arange(len(self.episodes)), counts)
        self._start = np.concatenate([np.arange(c) * stride for c in counts])

    def __len__(self) -> int:
        return int(self._episode.shape[0])

    def window(self, index: int) -> tuple[int, int]:
        """(episode index, first frame) of window ``index``."""
        return int(self._episode[index]), int(self._start[index])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"window {index} out of range [0, {len(self)})")
        e, s = self.window(index)
        ep = self.episodes[e]
        actions = ep.actions[s : s + self.n_frames].astype(np.int64)
        actions[actions == NO_ACTION] = self.null_action
        return {
            "frames": to_model_frames(ep.frames[s : s + self.n_frames]),  # (T, C, H, W)
            "actions": torch.from_numpy(actions),  # (T,)
        }


def random_windows(
    episodes: Sequence[Episode],
    n_frames: int,
    batch: int,
    rng: np.random.Generator,
    null_action: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A batch of windows drawn uniformly over all windows (stride 1), with replacement.

    Returns frames uint8 (B, T, H, W, 3) and actions int64 (B, T); -1 stays -1 unless
    ``null_action`` is given. Pure numpy, for the training loop's hot path.
    """
    if n_frames < 1 or batch < 1:
        raise ValueError(f"n_frames and batch must be >= 1, got {n_frames} and {batch}")
    counts = _window_counts(episodes, n_frames, 1)
    total = int(counts.sum())
    if total == 0:
        raise ValueError(f"no episode has {n_frames} frames: no windows")
    flat = rng.integers(0, total, size=batch)
    ends = np.cumsum(counts)
    which = np.searchsorted(ends, flat, side="right")  # episode of each window
    starts = flat - (ends[which] - counts[which])
    h, w, c = episodes[int(which[0])].frames.shape[1:]
    frames = np.empty((batch, n_frames, h, w, c), dtype=np.uint8)  # (B, T, H, W, C)
    actions = np.empty((batch, n_frames), dtype=np.int64)  # (B, T)
    for b, (e, s) in enumerate(zip(which, starts, strict=True)):
        frames[b] = episodes[e].frames[s : s + n_frames]
        actions[b] = episodes[e].actions[s : s + n_frames]
    if null_action is not None:
        actions[actions == NO_ACTION] = null_action
    return frames, actions
