"""Scheduling matrices of diffusion forcing (Chen et al. 2024), exact to the reference formulas.

A matrix M has one row per denoising row m and one column per frame t of the chunk; entries
are step indices in [0, S] (S = pure noise, 0 = clean) that `NoiseSchedule.sampling_levels`
maps to noise levels. Row m -> m+1 moves every frame from M[m, t] to M[m+1, t]; a frame whose
entry does not change is left untouched. Every matrix starts at S everywhere and ends at 0
everywhere, and every column is non-increasing.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dfserve.model.config import SCHEDULES, ScheduleName
from dfserve.model.errors import FieldError


def pyramid(steps: int, horizon: int, uncertainty_scale: float) -> np.ndarray:
    """M[m, t] = clip(S + int(t u) - m, 0, S), height S + int((H-1) u) + 1."""
    height = steps + int((horizon - 1) * uncertainty_scale) + 1
    m = np.arange(height)[:, None]
    offsets = np.array([int(t * uncertainty_scale) for t in range(horizon)])[None, :]
    return np.clip(steps + offsets - m, 0, steps).astype(np.int64)


def autoregressive(steps: int, horizon: int) -> np.ndarray:
    """Pyramid with u = S: each frame starts after the previous one is clean."""
    return pyramid(steps, horizon, float(steps))


def full_sequence(steps: int, horizon: int) -> np.ndarray:
    """Every frame at the same level: M[m, :] = S - m."""
    return np.repeat(np.arange(steps, -1, -1, dtype=np.int64)[:, None], horizon, axis=1)


def trapezoid(steps: int, horizon: int, uncertainty_scale: float) -> np.ndarray:
    """Both ends first, the middle last: columns t and H-1-t share S + int(t u) - m.

    The reference assigns columns t and -t, so for even H the middle column H//2 is never
    written and stays 0 (treated as clean, never denoised). dfserve pairs t with H-1-t, which
    is symmetric for every H, and keeps rows until every column reaches 0.
    """
    half = (horizon + 1) // 2
    height = steps + int((half - 1) * uncertainty_scale) + 1
    m = np.arange(height)[:, None]
    out = np.zeros((height, horizon), dtype=np.int64)
    for t in range(half):
        column = np.clip(steps + int(t * uncertainty_scale) - m[:, 0], 0, steps)
        out[:, t] = column
        out[:, horizon - 1 - t] = column
    return out


# The schedules by name, each as (steps S, horizon H, uncertainty scale u) -> matrix:
# SamplingConfig.schedule picks one. A new schedule is a function above, a line here and its
# name in model.config.ScheduleName.
ScheduleMatrix = Callable[[int, int, float], np.ndarray]
SCHEDULE_MATRICES: dict[ScheduleName, ScheduleMatrix] = {
    "pyramid": pyramid,
    "autoregressive": lambda steps, horizon, u: autoregressive(steps, horizon),
    "full_sequence": lambda steps, horizon, u: full_sequence(steps, horizon),
    "trapezoid": trapezoid,
}


def scheduling_matrix(
    schedule: str, steps: int, horizon: int, uncertainty_scale: float = 1.0
) -> np.ndarray:
    if steps < 1:
        raise FieldError("steps", f"{steps} must be >= 1")
    if horizon < 1:
        raise FieldError("horizon", f"{horizon} must be >= 1")
    # any str may come, so the lookup's key type is ignored, and its value type kept
    matrix: ScheduleMatrix | None = SCHEDULE_MATRICES.get(schedule)  # type: ignore[call-overload]
    if matrix is None:
        raise FieldError("schedule", f"{schedule!r} is not an accepted value", list(SCHEDULES))
    return matrix(steps, horizon, uncertainty_scale)
