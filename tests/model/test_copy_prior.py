"""The copy prior counted from data (model.copy_prior) against worlds whose moves are known."""

from __future__ import annotations

import numpy as np
import torch

from dfserve.model.copy_prior import choice_distribution, count_copy_prior, pixel_sets
from dfserve.model.data.shards import Episode
from dfserve.model.network import COPY_SHIFTS

PATCH, TILES = 4, 6


def walking_episode(seed: int, length: int = 12) -> Episode:
    """A random tiled world seen through a window: action 1 moves the view one tile left (the
    content moves right), action 2 one tile right, action 0 stays; actions drawn at random."""
    rng = np.random.default_rng(seed)
    world = rng.integers(0, 255, (TILES * 8, TILES * 8, 3), dtype=np.uint8)
    world = world.repeat(PATCH, 0).repeat(PATCH, 1)  # tiles of PATCH pixels
    actions = rng.integers(0, 3, length + 1)
    actions[0] = -1
    col, frames = TILES * 4, []
    for t in range(length + 1):
        col += {1: -1, 2: 1}.get(int(actions[t]), 0)
        view = world[TILES * 2 : TILES * 3, col : col + TILES]  # in tiles, then pixels
        frames.append(world[TILES * 2 * PATCH : TILES * 3 * PATCH,
                            col * PATCH : (col + TILES) * PATCH])  # fmt: skip
        assert view.shape[:2] == (TILES, TILES)
    return Episode(frames=np.stack(frames), actions=actions.astype(np.int64), seed=seed)


def test_each_action_puts_its_mass_on_the_copy_its_move_gives():
    episodes = [walking_episode(s) for s in range(6)]
    p = count_copy_prior(episodes, n_actions=3, patch=PATCH).exp()
    assert p.shape == (4, len(COPY_SHIFTS) + 1)
    torch.testing.assert_close(p.sum(1), torch.ones(4))
    assert p[0, COPY_SHIFTS.index((0, 0))] > 0.9  # stay: the copy as it was
    assert p[1, COPY_SHIFTS.index((0, 1))] > 0.7  # view left: the copy moved right (plus
    assert p[2, COPY_SHIFTS.index((0, -1))] > 0.7  # the new column, "none")
    assert p[1, -1] > 0.05 and p[0, -1] < 0.05


def test_the_maximum_likelihood_split_of_ambiguous_pixels():
    """Pixels held by {0, 1} and pixels held by {0} alone: all mass goes to choice 0 (which
    explains both), not the even split the first look would give."""
    counts = torch.zeros(1 << (len(COPY_SHIFTS) + 1), dtype=torch.float64)
    counts[0b000011], counts[0b000001] = 1000.0, 1000.0
    p = choice_distribution(counts)
    assert p[0] > 0.99


def test_flat_ground_votes_for_nothing():
    """A still, flat frame: its inner pixels are held by every copy and leave the estimate
    where it was; its border pixels (which the moved copies leave empty) are held by the copy
    as it was alone, so it takes the mass."""
    before = torch.full((1, 16, 16, 3), 7, dtype=torch.uint8)
    sets = pixel_sets(before, before.clone(), PATCH)[0]
    every_copy = (1 << len(COPY_SHIFTS)) - 1
    assert sets[every_copy] == 8 * 8 and sets.sum() == 16 * 16
    assert choice_distribution(sets)[COPY_SHIFTS.index((0, 0))] > 0.9  # 1-pixel smoothing
