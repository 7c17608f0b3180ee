"""Training: the DF / TF objectives, dropout, loss weighting, resumable checkpoints, bundles.

Everything runs the `tiny` preset (16x16 frames, 4 actions) on a synthetic dataset: a bright
square that the actions move, so there is something action-dependent to learn.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dfserve.model.bundle import load_bundle
from dfserve.model.config import TrainConfig, preset, train_preset
from dfserve.model.data.shards import NO_ACTION, Episode, write_meta, write_shard
from dfserve.model.diffusion import NoiseSchedule
from dfserve.model.rollout import RolloutEngine, RolloutRequest
from dfserve.model.train import (
    CHECKPOINT,
    Trainer,
    apply_clean_frames,
    apply_clean_history,
    apply_dropout,
    diffusion_loss,
    loss_weights,
    run_training,
    sample_levels,
)

TINY = preset("tiny")
ACTIONS = TINY.data.action_names  # noop, left, right, up
MOVES = {0: (0, 0), 1: (0, -1), 2: (0, 1), 3: (-1, 0)}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def synthetic_episode(seed: int, length: int = 64, r: int = 16) -> Episode:
    rng = np.random.default_rng(seed)
    frames = np.zeros((length, r, r, 3), np.uint8)
    actions = np.full(length, NO_ACTION, np.int64)
    y, x = rng.integers(3, r - 6, size=2)
    colour = rng.integers(80, 256, size=3)
    for i in range(length):
        if i:
            actions[i] = rng.integers(0, 4)
            dy, dx = MOVES[int(actions[i])]
            y, x = (y + dy) % (r - 4), (x + dx) % (r - 4)
        frames[i, :, :] = (20, 30, 40)
        frames[i, y : y + 4, x : x + 4] = colour
    return Episode(frames, actions, seed)


def write_synthetic(folder: Path, episodes: int, seed_start: int) -> Path:
    folder.mkdir(parents=True)
    eps = [synthetic_episode(seed_start + i) for i in range(episodes)]
    write_shard(folder / "shard_00000.npz", eps)
    write_meta(folder, {"env": "synthetic", "action_names": list(ACTIONS), "episodes": episodes,
                        "frames": sum(len(e) for e in eps), "shards": ["shard_00000.npz"],
                        "seed_start": seed_start, "seed_end": seed_start + episodes})  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    return write_synthetic(root / "train", 6, 0), write_synthetic(root / "heldout", 2, 1000)


def fixed_batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    eps = [synthetic_episode(100 + i) for i in range(n)]
    frames = np.stack([e.frames[1:9] for e in eps])  # (B, A, H, W, C)
    x0 = torch.from_numpy(frames).permute(0, 1, 4, 2, 3).float() / 127.5 - 1
    return x0, torch.from_numpy(np.stack([e.actions[1:9] for e in eps]))


def fixed_loss(trainer: Trainer, x0: torch.Tensor, actions: torch.Tensor) -> float:
    """The loss on fixed levels and noise (same generator seed), averaged over a few draws."""
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        losses = [diffusion_loss(trainer.net, trainer.ns, x0, actions, trainer.train, gen)[0]
                  for _ in range(8)]  # fmt: skip
    return float(torch.stack(losses).mean())


def test_steps_on_one_batch_reduce_the_loss():
    trainer = Trainer(TINY, train_preset("tiny"))
    x0, actions = fixed_batch()
    before = fixed_loss(trainer, x0, actions)
    for _ in range(30):
        trainer.step(x0, actions)
    after = fixed_loss(trainer, x0, actions)
    assert after < 0.8 * before, (before, after)


def test_diffusion_forcing_draws_an_independent_level_per_frame():
    gen = torch.Generator().manual_seed(0)
    levels, mask = sample_levels("diffusion_forcing", 64, 8, 1000, gen)
    assert mask.all() and levels.min() >= 0 and levels.max() <= 999
    distinct = torch.tensor([len(set(row.tolist())) for row in levels])
    assert (distinct >= 6).all()  # 8 draws from 1000 levels: almost always all different
    # uniform over [0, T-1]: the mean of 512 draws is near 499.5
    assert abs(levels.double().mean().item() - 499.5) < 60
    # and through the real loss, with dropout off, the network sees those levels
    train = dataclasses.replace(TrainConfig(), action_dropout=0.0, history_dropout=0.0)
    trainer = Trainer(TINY, train)
    x0, actions = fixed_batch()
    _, info = diffusion_loss(trainer.net, trainer.ns, x0, actions, train, gen)
    assert all(len(set(row.tolist())) > 1 for row in info["levels"])
    assert torch.equal(info["actions"], actions)


def test_teacher_forcing_keeps_history_clean():
    gen = torch.Generator().manual_seed(0)
    levels, mask = sample_levels("teacher_forcing", 256, 8, 1000, gen)
    for row, m in zip(levels, mask, strict=True):
        split = int(torch.nonzero(m)[0])
        assert 1 <= split <= 7
        assert (row[:split] == -1).all() and not m[:split].any()  # clean history, no loss
        assert (row[split:] == row[split]).all() and row[split] >= 0  # one shared level
    # a clean level leaves the frame untouched: the network sees the true history
    ns = NoiseSchedule(TINY.diffusion)
    x0 = torch.rand(2, 8, 3, 16, 16)
    x = ns.q_sample(x0, levels[:2], torch.randn_like(x0))
    hist = levels[:2] == -1
    assert torch.equal(x[hist], x0[hist]) and not torch.equal(x[~hist], x0[~hist])


def test_clean_history_keeps_a_prefix_near_clean_and_the_rest_uniform():
    gen = torch.Generator().manual_seed(0)
    levels, _ = sample_levels("diffusion_forcing", 256, 8, 1000, gen)
    assert apply_clean_history(levels, 0.0, 15, gen) is levels  # off: untouched, no draws
    mixed = apply_clean_history(levels, 1.0, 15, gen)
    changed = mixed != levels
    for row, new, old in zip(changed, mixed, levels, strict=True):
        split = int(torch.nonzero(new > 15)[0]) if (new > 15).any() else 8
        assert split >= 1 and (new[:split] <= 15).all() and (new[:split] >= -1).all()
        assert not row[split:].any() and torch.equal(new[split:], old[split:])
    # the split is spread over the window: every frame but the last is sometimes history
    assert ((mixed <= 15) & (levels > 15)).any(0)[:7].all()


def test_clean_frames_are_drawn_per_frame_so_a_noisy_frame_often_follows_a_clean_one():
    gen = torch.Generator().manual_seed(0)
    levels, _ = sample_levels("diffusion_forcing", 512, 8, 1000, gen)
    assert apply_clean_frames(levels, 0.0, 15, gen) is levels  # off: untouched, no draws
    mixed = apply_clean_frames(levels, 0.5, 15, gen)
    changed = mixed != levels
    assert (mixed[changed] <= 15).all() and (mixed[changed] >= -1).all()
    assert 0.45 < float((mixed <= 15).float().mean()) < 0.55
    after_clean = (mixed[:, :-1] <= 15) & (mixed[:, 1:] >= 500)  # the scroll copy's case
    assert 0.1 < float(after_clean.float().mean()) < 0.15  # 1/2 x 1/2 x 1/2; a prefix: ~0.03


def test_dropout_replaces_actions_and_history():
    gen = torch.Generator().manual_seed(0)
    B, A, T, null = 32, 8, 1000, 4
    levels, mask = sample_levels("diffusion_forcing", B, A, T, gen)
    actions = torch.randint(0, 4, (B, A), generator=gen)
    always = dataclasses.replace(TrainConfig(), action_dropout=1.0, history_dropout=0.0)
    _, acts, _ = apply_dropout(levels, actions, mask, always, T, null, gen)
    assert (acts == null).all()
    hist = dataclasses.replace(TrainConfig(), action_dropout=0.0, history_dropout=1.0)
    lv, acts, m = apply_dropout(levels, actions, mask, hist, T, null, gen)
    for b in range(B):
        dropped = lv[b] == T - 1
        split = int(torch.nonzero(~dropped)[0]) if (~dropped).any() else A
        assert split >= 1 and dropped[:split].all()  # a prefix of the window, never frame 0 only
        assert (acts[b, :split] == null).all() and torch.equal(acts[b, split:], actions[b, split:])
        assert not m[b, :split].any() and torch.equal(lv[b, split:], levels[b, split:])
    never = dataclasses.replace(TrainConfig(), action_dropout=0.0, history_dropout=0.0)
    lv, acts, m = apply_dropout(levels, actions, mask, never, T, null, gen)
    assert torch.equal(lv, levels) and torch.equal(acts, actions) and torch.equal(m, mask)


def test_min_snr_weights_for_v():
    ns = NoiseSchedule(TINY.diffusion)  # v objective
    levels = torch.tensor([[-1, 0, 100, 500, 999]])
    ab = ns.alpha_bar(levels)
    snr = ab / (1 - ab)
    plain = loss_weights(ns, levels, 5.0, decay=0.0)  # no fusion: Hang et al.'s v weight
    assert plain[0, 0] == 0  # clean frames carry no loss
    torch.testing.assert_close(plain[0, 1:], (snr.clamp(max=5) / (snr + 1))[0, 1:].float())
    assert plain[0, 3] > plain[0, 1]  # the high-SNR end is damped, not the highest weight


def test_fused_min_snr_weights_next_frame_prediction():
    ns = NoiseSchedule(TINY.diffusion)
    after_clean = torch.tensor([[-1, -1, -1, 999]])
    after_noise = torch.tensor([[999, 999, 999, 999]])
    fused = loss_weights(ns, after_clean, 5.0, decay=0.9)
    plain = loss_weights(ns, after_clean, 5.0, decay=0.0)
    # clean history: running SNR mean 1, fused SNR 5 * (1 - (1 - 0.9)) = 4.5, v weight 4.5/5.5
    assert float(fused[0, 3]) == pytest.approx(4.5 / 5.5, rel=1e-3)
    assert float(plain[0, 3]) < 1e-3  # plain min-SNR ignores a pure-noise frame
    # a noisy history adds nothing: the weight stays that of the frame alone
    alone = loss_weights(ns, after_noise, 5.0, decay=0.9)
    assert float(alone[0, 3]) < 1e-3
    # the first frame of a window has no history: fused == plain
    mixed = torch.tensor([[300, 10, 999, 500]])
    assert float(loss_weights(ns, mixed, 5.0, 0.9)[0, 0]) == pytest.approx(
        float(loss_weights(ns, mixed, 5.0, 0.0)[0, 0])
    )


def test_resume_is_bit_exact(data_dirs, tmp_path):
    train_dir, _ = data_dirs
    straight = tmp_path / "straight"
    run_training(TINY, train_preset("tiny"), train_dir, tmp_path / "b1", straight,
                 steps=6, progress_bar=False)  # fmt: skip
    resumed = tmp_path / "resumed"
    run_training(TINY, train_preset("tiny"), train_dir, tmp_path / "b2", resumed,
                 steps=3, progress_bar=False)  # fmt: skip
    run_training(TINY, train_preset("tiny"), train_dir, tmp_path / "b3", resumed,
                 steps=6, progress_bar=False)  # fmt: skip
    a = torch.load(straight / CHECKPOINT, weights_only=True)
    b = torch.load(resumed / CHECKPOINT, weights_only=True)
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    pa, pb = json.loads(a["progress"]), json.loads(b["progress"])
    assert (pa["step"], pa["samples"]) == (pb["step"], pb["samples"]) == (6, 24)
    assert torch.equal(a["torch_rng"], b["torch_rng"]) and a["numpy_rng"] == b["numpy_rng"]
    # and the 3-step checkpoint really differs (the comparison can fail)
    half = tmp_path / "half"
    run_training(TINY, train_preset("tiny"), train_dir, tmp_path / "b4", half,
                 steps=3, progress_bar=False)  # fmt: skip
    c = torch.load(half / CHECKPOINT, weights_only=True)
    assert any(not torch.equal(a["model"][k], c["model"][k]) for k in a["model"])


def test_resume_refuses_another_objective(data_dirs, tmp_path):
    train_dir, _ = data_dirs
    run_training(TINY, train_preset("tiny"), train_dir, tmp_path / "b", tmp_path / "run",
                 steps=1, progress_bar=False)  # fmt: skip
    tf = dataclasses.replace(train_preset("tiny"), objective="teacher_forcing")
    with pytest.raises(ValueError, match="objective"):
        run_training(TINY, tf, train_dir, tmp_path / "b", tmp_path / "run", steps=2,
                     progress_bar=False)  # fmt: skip


@pytest.mark.parametrize("objective", ["diffusion_forcing", "teacher_forcing"])
def test_training_writes_a_bundle_that_loads_and_rolls_out(data_dirs, tmp_path, objective):
    train_dir, heldout_dir = data_dirs
    train = dataclasses.replace(train_preset("tiny"), objective=objective)
    out = tmp_path / "bundle"
    summary = run_training(TINY, train, train_dir, out, tmp_path / "run", heldout_dir,
                           steps=4, progress_bar=False)  # fmt: skip
    assert summary["steps"] == 4 and summary["samples"] == 4 * train.batch_size
    assert (tmp_path / "run" / "log.csv").read_text().startswith("step,loss,lr,samples_per_s")
    bundle = load_bundle(out)
    assert bundle.config == TINY
    card = (out / "README.md").read_text()
    assert "## Training" in card and "4 steps" in card and objective in card
    examples = bundle.examples()
    assert sorted(examples) == ["heldout-1000", "heldout-1001"]  # held-out seeds only
    ex = examples["heldout-1000"]
    assert ex.context.shape == (4, 16, 16, 3) and len(ex.actions) == 32
    # the bundle stores the EMA weights, not the raw ones
    ckpt = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    for k, v in bundle.network.state_dict().items():
        assert torch.equal(v, ckpt["ema"][k])
    context = torch.from_numpy(ex.context).permute(0, 3, 1, 2).float() / 127.5 - 1
    request = RolloutRequest(context[-3:], ex.actions[:5], bundle.config.sampling, seed=0)
    frames = [f for _, f in RolloutEngine(bundle).rollout(request)]
    assert len(frames) == 5 and all(torch.isfinite(f).all() for f in frames)


def test_training_refuses_data_of_another_frame_size(data_dirs, tmp_path):
    train_dir, _ = data_dirs
    meta = json.loads((train_dir / "meta.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    (other / "shard_00000.npz").write_bytes((train_dir / "shard_00000.npz").read_bytes())
    write_meta(other, {**{k: v for k, v in meta.items() if k not in ("format", "version")},
                       "resolution": [32, 32]})  # fmt: skip
    with pytest.raises(ValueError, match="32-px frames"):
        run_training(TINY, train_preset("tiny"), other, tmp_path / "b", tmp_path / "run",
                     steps=1, progress_bar=False)  # fmt: skip


def test_warm_start_takes_a_bundles_weights_and_refuses_another_network(
    tiny_bundle_dir, tmp_path
):
    trainer = Trainer(TINY, train_preset("tiny"))
    trainer.warm_start(tiny_bundle_dir)
    shipped = load_bundle(tiny_bundle_dir).network.state_dict()
    for k, v in trainer.net.state_dict().items():
        assert torch.equal(v, shipped[k]) and torch.equal(trainer.ema.state_dict()[k], v)
    wider = dataclasses.replace(TINY, network=dataclasses.replace(TINY.network, width=64))
    with pytest.raises(ValueError, match="same architecture"):
        Trainer(wider, train_preset("tiny")).warm_start(tiny_bundle_dir)


def test_action_gain_is_zero_for_an_action_blind_network_and_grows_with_the_prior():
    """The diagnostic probe: the last frame is the previous one moved by its move; with every
    action embedded alike and no prior, reversing the move changes nothing (gain 0); a prior
    that picks the matching shift makes the true move the cheaper one (gain > 0)."""
    from dfserve.model.network import COPY_SHIFTS, shift_frames
    from dfserve.model.train import ActionProbe, action_gain

    names = ("noop", "move_left", "move_right", "move_up")
    config = dataclasses.replace(TINY, data=dataclasses.replace(TINY.data, action_names=names),
                                 diffusion=dataclasses.replace(TINY.diffusion, objective="x0"))
    torch.manual_seed(0)
    trainer = Trainer(config, train_preset("tiny"))
    net = trainer.net.eval()
    g = torch.Generator().manual_seed(1)
    world = torch.rand(6, 3, 16, 48, generator=g) * 2 - 1
    # the view walks left one 4-px patch a frame, so its content moves right (move_left)
    x0 = torch.stack([world[..., 32 - 4 * t : 48 - 4 * t] for t in range(8)], 1)  # (B, A, ...)
    torch.testing.assert_close(shift_frames(x0[:, 6], 0, 4)[..., 4:], x0[:, 7, ..., 4:])
    true = torch.full((6, 8), 1)
    probe = ActionProbe(x0, true, torch.where(torch.arange(8) == 7, 2, true))
    with torch.no_grad():
        blind = net.action_embed.weight[:1].expand_as(net.action_embed.weight).clone()
        net.action_embed.weight.copy_(blind)
        net.copy_prior.weight.zero_()
        assert action_gain(net, trainer.ns, probe) == pytest.approx(0.0, abs=1e-6)
        net.copy_prior.weight[1, COPY_SHIFTS.index((0, 1))] = 10.0
        net.copy_prior.weight[2, COPY_SHIFTS.index((0, -1))] = 10.0
        assert action_gain(net, trainer.ns, probe) > 0.1
