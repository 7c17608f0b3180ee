"""Scheduling matrices against element-by-element transcriptions of DESIGN §4.

The oracles below are plain Python loops written from the reference formulas, kept separate
from the vectorised code in model/scheduling.py. Matrix letters: M[m, t], row m (denoising
row), column t (frame of the chunk); S steps, H horizon, u uncertainty scale.
"""

from __future__ import annotations

import numpy as np
import pytest

from dfserve.model import scheduling
from dfserve.model.config import SCHEDULES
from dfserve.model.errors import FieldError

STEPS = range(1, 13)
HORIZONS = range(1, 10)


def scales(steps: int) -> list[float]:
    return [0.0, 0.5, 1.0, 1.5, 3.0, float(steps)]


def clip(value: int, steps: int) -> int:
    return max(0, min(steps, value))


# --- oracles: element-by-element transcriptions of DESIGN §4 ----------------------------------


def oracle_pyramid(steps: int, horizon: int, u: float) -> list[list[int]]:
    height = steps + int((horizon - 1) * u) + 1
    return [[clip(steps + int(t * u) - m, steps) for t in range(horizon)] for m in range(height)]


def oracle_autoregressive(steps: int, horizon: int) -> list[list[int]]:
    return oracle_pyramid(steps, horizon, float(steps))


def oracle_full_sequence(steps: int, horizon: int) -> list[list[int]]:
    return [[steps - m for _ in range(horizon)] for m in range(steps + 1)]


def oracle_trapezoid(steps: int, horizon: int, u: float) -> list[list[int]]:
    """Columns t and H-1-t share S + int(t u) - m for t < (H+1)//2, rows until all are 0."""
    rows: list[list[int]] = []
    m = 0
    while True:
        row = [-1] * horizon
        for t in range((horizon + 1) // 2):
            row[t] = clip(steps + int(t * u) - m, steps)
            row[horizon - 1 - t] = clip(steps + int(t * u) - m, steps)
        assert -1 not in row  # every column assigned
        rows.append(row)
        if all(v == 0 for v in row):
            return rows
        m += 1


def reference_trapezoid(steps: int, horizon: int, u: float) -> np.ndarray:
    """The diffusion-forcing reference verbatim in behaviour: it pairs t with -t (not H-1-t)
    and its height is S + int(((H+1)//2) * u)."""
    height = steps + int((horizon + 1) // 2 * u)
    matrix = np.zeros((height, horizon), dtype=np.int64)
    for m in range(height):
        for t in range((horizon + 1) // 2):
            matrix[m, t] = steps + int(t * u) - m
            matrix[m, -t] = steps + int(t * u) - m
    return np.clip(matrix, 0, steps)


def oracle(schedule: str, steps: int, horizon: int, u: float) -> list[list[int]]:
    if schedule == "pyramid":
        return oracle_pyramid(steps, horizon, u)
    if schedule == "autoregressive":
        return oracle_autoregressive(steps, horizon)
    if schedule == "full_sequence":
        return oracle_full_sequence(steps, horizon)
    return oracle_trapezoid(steps, horizon, u)


# --- exactness --------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_matrix_equals_element_by_element_oracle(schedule: str) -> None:
    n = 0
    for s in STEPS:
        for h in HORIZONS:
            for u in scales(s):
                got = scheduling.scheduling_matrix(schedule, s, h, u)
                want = oracle(schedule, s, h, u)
                assert got.dtype == np.int64
                assert got.tolist() == want, (schedule, s, h, u)
                n += 1
    assert n == 12 * 9 * 6


def test_pyramid_height_and_known_example() -> None:
    for s in STEPS:
        for h in HORIZONS:
            for u in scales(s):
                assert scheduling.pyramid(s, h, u).shape == (s + int((h - 1) * u) + 1, h)
    # S=3, H=3, u=1.5: offsets int(0)=0, int(1.5)=1, int(3.0)=3; height 3 + 3 + 1 = 7
    assert scheduling.pyramid(3, 3, 1.5).tolist() == [
        [3, 3, 3],
        [2, 3, 3],
        [1, 2, 3],
        [0, 1, 3],
        [0, 0, 2],
        [0, 0, 1],
        [0, 0, 0],
    ]


def test_autoregressive_is_pyramid_with_u_equal_steps() -> None:
    for s in STEPS:
        for h in HORIZONS:
            np.testing.assert_array_equal(
                scheduling.autoregressive(s, h), scheduling.pyramid(s, h, float(s))
            )
            assert scheduling.autoregressive(s, h).shape == (s * h + 1, h)


def test_full_sequence_known_example_and_u_zero_pyramid() -> None:
    assert scheduling.full_sequence(3, 2).tolist() == [[3, 3], [2, 2], [1, 1], [0, 0]]
    for s in STEPS:
        for h in HORIZONS:
            # u = 0: no offsets, the pyramid collapses to the full sequence
            np.testing.assert_array_equal(
                scheduling.pyramid(s, h, 0.0), scheduling.full_sequence(s, h)
            )


@pytest.mark.parametrize("horizon", [4, 5])
def test_trapezoid_known_examples_odd_and_even(horizon: int) -> None:
    got = scheduling.trapezoid(2, horizon, 1.0).tolist()
    if horizon == 4:  # pairs (0, 3) offset 0, (1, 2) offset 1
        assert got == [[2, 2, 2, 2], [1, 2, 2, 1], [0, 1, 1, 0], [0, 0, 0, 0]]
    else:  # pairs (0, 4) offset 0, (1, 3) offset 1, middle column 2 alone with offset 2
        assert got == [
            [2, 2, 2, 2, 2],
            [1, 2, 2, 2, 1],
            [0, 1, 2, 1, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 0, 0, 0],
        ]


def test_trapezoid_is_symmetric_ends_first_middle_last() -> None:
    for s in STEPS:
        for h in HORIZONS:
            for u in scales(s):
                matrix = scheduling.trapezoid(s, h, u)
                np.testing.assert_array_equal(matrix, matrix[:, ::-1])
                # the middle column(s) are the last to become clean
                clean_at = [int(np.argmax(matrix[:, t] == 0)) for t in range(h)]
                assert max(clean_at) == clean_at[(h - 1) // 2] == clean_at[h // 2]
                assert clean_at[0] == s


def test_reference_trapezoid_even_horizon_defect_and_dfserve_fix() -> None:
    """DF pairs t with -t: for even H the middle column H//2 is never assigned, so it stays 0 in
    every row (treated as clean from the start, never denoised). dfserve pairs t with H-1-t."""
    for s in STEPS:
        for h in HORIZONS:
            for u in [1.0, 1.5, 3.0]:
                ref = reference_trapezoid(s, h, u)
                ours = scheduling.trapezoid(s, h, u)
                if h % 2 == 0:
                    assert (ref[:, h // 2] == 0).all(), (s, h, u)  # the defect
                    assert ours[0, h // 2] == s  # fixed: the middle column starts as noise
                    assert set(ours[:, h // 2].tolist()) == set(range(s + 1))
                else:  # every column assigned in the reference too
                    assert (ref[0] == s).all()
                # the left half is identical (t pairs with itself on that side)
                rows = min(len(ref), len(ours))
                np.testing.assert_array_equal(ref[:rows, : h // 2], ours[:rows, : h // 2])
    # the concrete even case: H=4, S=2, u=1 -> reference column 2 is never denoised
    assert reference_trapezoid(2, 4, 1.0)[:, 2].tolist() == [0, 0, 0, 0]
    assert scheduling.trapezoid(2, 4, 1.0)[:, 2].tolist() == [2, 2, 1, 0]


# --- invariants -------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_invariants_first_last_rows_monotone_columns_every_level(schedule: str) -> None:
    for s in STEPS:
        for h in HORIZONS:
            for u in scales(s):
                matrix = scheduling.scheduling_matrix(schedule, s, h, u)
                assert matrix.shape[1] == h
                assert (matrix[0] == s).all(), (schedule, s, h, u)
                assert (matrix[-1] == 0).all(), (schedule, s, h, u)
                assert (np.diff(matrix, axis=0) <= 0).all(), (schedule, s, h, u)
                for t in range(h):
                    column = matrix[:, t]
                    # every frame visits every level S..0 in that order, one step per move, so
                    # the per-frame trajectory is the same under every schedule
                    assert sorted(set(column.tolist()), reverse=True) == list(range(s, -1, -1))
                    moves = np.diff(column)
                    assert set(moves.tolist()) <= {0, -1}
                    # once a frame starts moving it moves every row until clean
                    first, last = (
                        int(np.argmax(moves != 0)),
                        len(moves) - int(np.argmax(moves[::-1] != 0)),
                    )
                    assert (moves[first:last] == -1).all(), (schedule, s, h, u, t)


def test_autoregressive_frame_starts_only_when_previous_is_clean() -> None:
    for s in STEPS:
        for h in HORIZONS:
            matrix = scheduling.autoregressive(s, h)
            for m in range(matrix.shape[0] - 1):
                for t in range(1, h):
                    if matrix[m + 1, t] != matrix[m, t]:
                        assert matrix[m, t - 1] == 0, (s, h, m, t)
                # at most one frame moves per row
                assert int((matrix[m + 1] != matrix[m]).sum()) == 1


def test_pyramid_with_unit_scale_lags_one_row_per_frame() -> None:
    matrix = scheduling.pyramid(4, 3, 1.0)
    for t in range(1, 3):
        np.testing.assert_array_equal(matrix[1:, t], matrix[:-1, t - 1])


# --- validation -------------------------------------------------------------------------------


def test_unknown_schedule_raises_naming_the_field() -> None:
    with pytest.raises(FieldError, match=r"schedule: 'spiral'") as e:
        scheduling.scheduling_matrix("spiral", 4, 3)
    assert (e.value.field, e.value.accepted) == ("schedule", list(SCHEDULES))


def test_every_schedule_name_has_its_function() -> None:
    assert list(scheduling.SCHEDULE_MATRICES) == list(SCHEDULES)


@pytest.mark.parametrize("steps", [0, -1])
def test_steps_below_one_raise_naming_the_field(steps: int) -> None:
    with pytest.raises(ValueError, match=r"^steps: "):
        scheduling.scheduling_matrix("pyramid", steps, 3)


def test_horizon_below_one_raises_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"^horizon: "):
        scheduling.scheduling_matrix("full_sequence", 4, 0)
