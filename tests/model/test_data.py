"""Crafter data pipeline: generation, shards, window datasets.

Crafter's reset costs about a second (world generation), so the real-environment tests
share two tiny datasets (2 episodes × 30 steps) generated once per module.
"""

from __future__ import annotations

import json
from pathlib import Path

import crafter
import numpy as np
import pytest
import torch

from dfserve.model.data import crafter as gen
from dfserve.model.data.crafter import (
    CRAFTER_ACTIONS,
    HELDOUT_SEED_START,
    MOVES,
    RandomRunPolicy,
    generate_dataset,
    run_episode,
)
from dfserve.model.data.shards import (
    Episode,
    WindowDataset,
    load_episodes,
    load_meta,
    load_shard,
    random_windows,
    write_shard,
)

EPISODES, STEPS, SEED_START = 2, 30, 7
R = gen.RESOLUTION  # 72: Crafter's 9 tiles of 8 px
SHARD_KEYS = ("frames", "actions", "episode_starts", "episode_lengths", "episode_seeds",
              "episode_died")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("crafter") / "w1"
    return generate_dataset(out, EPISODES, STEPS, seed_start=SEED_START, workers=1,
                            shard_episodes=1, progress=False)


@pytest.fixture(scope="module")
def dataset_w2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("crafter") / "w2"
    return generate_dataset(out, EPISODES, STEPS, seed_start=SEED_START, workers=2,
                            shard_episodes=1, progress=False)


def _shards(directory: Path) -> list[dict[str, np.ndarray]]:
    out = []
    for name in load_meta(directory)["shards"]:
        with np.load(directory / name) as z:
            out.append({k: z[k] for k in z.files})
    return out


# ----------------------------------------------------------------------------- actions


def test_crafter_actions_come_from_the_package() -> None:
    assert CRAFTER_ACTIONS == tuple(crafter.constants.actions)
    assert len(CRAFTER_ACTIONS) == 17
    assert CRAFTER_ACTIONS[:5] == ("noop", "move_left", "move_right", "move_up", "move_down")
    assert CRAFTER_ACTIONS[-1] == "make_iron_sword"
    assert HELDOUT_SEED_START == 1_000_000


def test_policy_covers_every_action_moves_mostly_and_repeats() -> None:
    policy = RandomRunPolicy()
    a = policy.actions(np.random.default_rng(0), 5000)
    assert a.dtype == np.int64 and a.shape == (5000,)
    assert set(a.tolist()) == set(range(17))
    moves = np.isin(a, [CRAFTER_ACTIONS.index(m) for m in MOVES]).mean()
    assert 0.58 <= moves <= 0.72
    runs = 1 + np.count_nonzero(np.diff(a))  # maximal runs of one action
    # two consecutive runs may draw the same action, so observed runs are a bit longer
    assert 3.0 <= len(a) / runs <= 5.0


def test_policy_is_deterministic_by_seed() -> None:
    policy = RandomRunPolicy()
    a = policy.actions(np.random.default_rng(3), 300)
    assert np.array_equal(a, policy.actions(np.random.default_rng(3), 300))
    assert not np.array_equal(a, policy.actions(np.random.default_rng(4), 300))


def test_policy_rejects_missing_or_zero_weights() -> None:
    with pytest.raises(ValueError, match="weight"):
        RandomRunPolicy(weights={"noop": 1.0})
    with pytest.raises(ValueError, match="weight"):
        RandomRunPolicy(weights={a: float(a != "sleep") for a in CRAFTER_ACTIONS})


# ----------------------------------------------------------------------------- generation


def test_generation_is_deterministic_and_worker_independent(
    dataset: Path, dataset_w2: Path
) -> None:
    a, b = _shards(dataset), _shards(dataset_w2)
    assert len(a) == len(b) == EPISODES  # shard_episodes=1
    for sa, sb in zip(a, b, strict=True):
        assert set(sa) == set(sb) == set(SHARD_KEYS)
        for k in SHARD_KEYS:
            assert sa[k].dtype == sb[k].dtype and np.array_equal(sa[k], sb[k]), k


def test_shard_layout_and_meta(dataset: Path) -> None:
    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["env"] == "crafter" and meta["env_version"] == "1.8.3"
    assert meta["resolution"] == [R, R] and meta["action_names"] == list(CRAFTER_ACTIONS)
    assert meta["steps"] == STEPS and meta["episodes"] == EPISODES
    assert (meta["seed_start"], meta["seed_end"]) == (SEED_START, SEED_START + EPISODES)
    assert meta["policy"]["name"] == "random_runs"
    shards = _shards(dataset)
    assert meta["frames"] == sum(len(s["frames"]) for s in shards)
    for k, s in enumerate(shards):
        n = len(s["frames"])
        assert s["frames"].dtype == np.uint8 and s["frames"].shape == (n, R, R, 3)
        assert s["actions"].dtype == np.int16 and s["actions"].shape == (n,)
        assert s["episode_seeds"].tolist() == [SEED_START + k]
        assert s["episode_starts"].tolist() == [0] and s["episode_lengths"].tolist() == [n]
        assert n == STEPS + 1 or s["episode_died"][0]


def test_refuses_to_overwrite_and_bad_arguments(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="already holds"):
        generate_dataset(dataset, 1, 5, progress=False)
    with pytest.raises(ValueError, match="episodes"):
        generate_dataset(tmp_path, 0, progress=False)
    with pytest.raises(ValueError, match="workers"):
        generate_dataset(tmp_path, 1, workers=0, progress=False)
    with pytest.raises(ValueError, match="not a .*dataset"):
        load_episodes(tmp_path)


def test_round_trip(dataset: Path) -> None:
    episodes = load_episodes(dataset)
    shards = _shards(dataset)
    assert [e.seed for e in episodes] == [SEED_START, SEED_START + 1]
    for ep, s in zip(episodes, shards, strict=True):
        assert ep.frames.dtype == np.uint8 and ep.frames.shape == (len(ep), R, R, 3)
        assert ep.actions.dtype == np.int64 and ep.actions.shape == (len(ep),)
        assert np.array_equal(ep.frames, s["frames"])
        assert np.array_equal(ep.actions, s["actions"])
        assert ep.actions[0] == -1 and (ep.actions[1:] >= 0).all()
        assert (ep.actions[1:] < 17).all()


def test_write_shard_round_trip_several_episodes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    eps = [
        Episode(rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8),
                np.r_[-1, rng.integers(0, 17, n - 1)].astype(np.int64), seed, died)
        for n, seed, died in [(4, 10, False), (1, 11, True), (7, 12, False)]
    ]
    write_shard(tmp_path / "s.npz", eps)
    back = load_shard(tmp_path / "s.npz")
    assert [(e.seed, e.died, len(e)) for e in back] == [(10, False, 4), (11, True, 1),
                                                        (12, False, 7)]
    for a, b in zip(eps, back, strict=True):
        assert np.array_equal(a.frames, b.frames) and np.array_equal(a.actions, b.actions)


# ----------------------------------------------------------------------------- alignment


def test_actions_align_with_frames_by_replay(dataset: Path) -> None:
    """Replaying actions[1..] in a fresh crafter Env(size, seed) renders exactly frames[1..]."""
    moved = 0
    for ep in load_episodes(dataset):
        env = gen.make_env(ep.seed)
        assert isinstance(env, crafter.Env) and tuple(env._size) == (R, R)
        assert np.array_equal(env.reset(), ep.frames[0])
        pos = None
        for i in range(1, len(ep)):
            obs, _, done, info = env.step(int(ep.actions[i]))
            assert np.array_equal(obs, ep.frames[i]), f"seed {ep.seed} frame {i}"
            # sanity: a move that changed the player's position scrolls the view
            if CRAFTER_ACTIONS[ep.actions[i]] in MOVES and pos is not None:
                if not np.array_equal(pos, info["player_pos"]):
                    assert not np.array_equal(ep.frames[i], ep.frames[i - 1])
                    moved += 1
            pos = info["player_pos"].copy()
        assert bool(done) == ep.died
    assert moved >= 3  # the policy does travel


class _Creature:
    def __init__(self, x: int, y: int) -> None:
        self.pos = np.array([x, y])


def test_env_despawns_in_a_reproducible_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stock crafter iterates a set ordered by id(); DeterministicEnv orders by position."""
    seen: list[list[tuple[int, int]]] = []

    def record(self: crafter.Env, chunk: object, objs: object, *args: object) -> None:
        seen.append([tuple(o.pos.tolist()) for o in objs])  # type: ignore[attr-defined]

    monkeypatch.setattr(crafter.Env, "_balance_object", record)
    env = gen.make_env(0)
    creatures = [_Creature(3, 1), _Creature(0, 5), _Creature(0, 2), _Creature(7, 0)]
    env._balance_object((0, 12, 0, 12), set(creatures))
    env._balance_object((0, 12, 0, 12), set(reversed(creatures)))
    assert seen == [[(0, 2), (0, 5), (3, 1), (7, 0)]] * 2


class _DyingEnv:
    """Stands in for crafter.Env: frames count steps, the player dies at step 5."""

    def __init__(self) -> None:
        self.t = 0

    def reset(self) -> np.ndarray:
        return np.zeros((R, R, 3), np.uint8)

    def step(self, action: int) -> tuple[np.ndarray, float, bool, dict]:
        self.t += 1
        return np.full((R, R, 3), self.t, np.uint8), 0.0, self.t == 5, {}


def test_death_ends_the_episode_early(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(gen, "make_env", lambda seed, size: _DyingEnv())
    ep = run_episode(3, steps=20)
    assert len(ep) == 6 and ep.died
    assert ep.frames[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 5]
    planned = RandomRunPolicy().actions(np.random.default_rng(3), 20)
    assert np.array_equal(ep.actions[1:], planned[:5])
    generate_dataset(tmp_path, 3, 20, workers=1, shard_episodes=2, progress=False)
    meta = load_meta(tmp_path)
    assert (meta["deaths"], meta["frames"], meta["shards"]) == (
        3, 18, ["shard_00000.npz", "shard_00001.npz"])
    assert [(len(e), e.died) for e in load_episodes(tmp_path)] == [(6, True)] * 3


# ----------------------------------------------------------------------------- windows


def _coded_episodes(lengths: list[int]) -> list[Episode]:
    """Pixel value 50·e + i marks frame i of episode e; action i is i % 17 (0: -1)."""
    eps = []
    for e, n in enumerate(lengths):
        frames = (50 * e + np.arange(n, dtype=np.uint8))[:, None, None, None]
        actions = np.r_[-1, np.arange(1, n) % 17].astype(np.int64)
        eps.append(Episode(np.broadcast_to(frames, (n, 64, 64, 3)).copy(), actions, seed=e))
    return eps


def _decode(frames: torch.Tensor) -> np.ndarray:
    """(T, 3, 64, 64) in [-1, 1] -> the code of each frame."""
    codes = ((frames + 1) * 127.5).round().to(torch.int64)
    assert (codes == codes[:, :1, :1, :1]).all()  # every pixel of a frame carries its code
    return codes[:, 0, 0, 0].numpy()


@pytest.mark.parametrize(("stride", "expected"), [(1, 2 + 6 + 0 + 9), (3, 1 + 2 + 0 + 3)])
def test_window_dataset_stays_inside_episodes(stride: int, expected: int) -> None:
    ds = WindowDataset(_coded_episodes([5, 9, 3, 12]), n_frames=4, null_action=17,
                       stride=stride)
    assert len(ds) == expected
    seen = set()
    for k in range(len(ds)):
        item = ds[k]
        assert item["frames"].dtype == torch.float32 and item["frames"].shape == (4, 3, 64, 64)
        assert item["actions"].dtype == torch.int64 and item["actions"].shape == (4,)
        codes = _decode(item["frames"])
        e, start = divmod(int(codes[0]), 50)
        assert codes.tolist() == [50 * e + start + j for j in range(4)]  # one episode, in order
        assert start % stride == 0 and (e, start) == ds.window(k)
        want = [17 if start + j == 0 else (start + j) % 17 for j in range(4)]
        assert item["actions"].tolist() == want  # -1 became null_action
        seen.add((e, start))
    assert len(seen) == expected


def test_window_dataset_value_range_and_null_action(dataset: Path) -> None:
    ds = WindowDataset(dataset, n_frames=8, null_action=17)
    assert len(ds) == EPISODES * (STEPS + 1 - 8 + 1)
    items = [ds[k] for k in range(0, len(ds), 5)]
    x = torch.stack([it["frames"] for it in items])
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.1
    acts = torch.stack([it["actions"] for it in items])
    assert (acts >= 0).all() and (acts <= 17).all()
    assert ds[0]["actions"][0] == 17 and (ds[1]["actions"] != 17).all()
    # uint8 0 and 255 land exactly on -1 and 1, channels first
    ep = Episode(np.stack([np.zeros((64, 64, 3), np.uint8), np.full((64, 64, 3), 255, np.uint8)]),
                 np.array([-1, 0]), seed=0)
    ep.frames[1, :, :, 0] = 0  # red channel dark in frame 1
    f = WindowDataset([ep], n_frames=2, null_action=5)[0]["frames"]
    assert (f[0] == -1).all() and (f[1, 0] == -1).all() and (f[1, 1:] == 1).all()


def test_window_dataset_rejects_bad_arguments() -> None:
    eps = _coded_episodes([5])
    with pytest.raises(ValueError, match="no windows"):
        WindowDataset(eps, n_frames=6, null_action=17)
    with pytest.raises(ValueError, match="stride"):
        WindowDataset(eps, n_frames=2, null_action=17, stride=0)
    with pytest.raises(ValueError, match="n_frames"):
        WindowDataset(eps, n_frames=0, null_action=17)
    with pytest.raises(IndexError):
        WindowDataset(eps, n_frames=5, null_action=17)[1]


def test_random_windows() -> None:
    eps = _coded_episodes([5, 9, 3, 12])
    frames, actions = random_windows(eps, 4, 400, np.random.default_rng(0))
    assert frames.dtype == np.uint8 and frames.shape == (400, 4, 64, 64, 3)
    assert actions.dtype == np.int64 and actions.shape == (400, 4)
    codes = frames[:, :, 0, 0, 0].astype(np.int64)  # (B, T)
    assert (np.diff(codes, axis=1) == 1).all()  # consecutive frames of one episode
    episode, start = np.divmod(codes[:, 0], 50)
    assert set(episode.tolist()) == {0, 1, 3}  # episode 2 is shorter than a window
    assert (start + 4 <= np.array([5, 9, 3, 12])[episode]).all()
    assert (actions[start == 0, 0] == -1).all() and (actions[:, 1:] >= 0).all()
    again, _ = random_windows(eps, 4, 400, np.random.default_rng(0))
    assert np.array_equal(frames, again)
    _, nulls = random_windows(eps, 4, 400, np.random.default_rng(0), null_action=17)
    assert np.array_equal(nulls, np.where(actions == -1, 17, actions))


def test_size_sets_the_render_resolution(tmp_path: Path) -> None:
    """--size N renders N x N frames with size // 9 px tiles: at 64 a 7-px tile grid leaves a
    1-px black border on the right of the world, at 72 the 8-px tiles fill it."""
    for size in (64, 72):
        out = generate_dataset(tmp_path / str(size), episodes=1, steps=3, seed_start=5,
                               workers=1, progress=False, size=size)  # fmt: skip
        assert json.loads((out / "meta.json").read_text())["resolution"] == [size, size]
        frames = load_episodes(out)[0].frames
        assert frames.shape[1:] == (size, size, 3)
        world_right_column = frames[:, : 7 * (size // 9), -1]
        assert world_right_column.any() == (size == 72)
