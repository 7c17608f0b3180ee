"""World-model metrics: closed-form cases for PSNR/SSIM/stability, and one real evaluation run
(a small random 64x64 model against two real Crafter episodes, action fidelity included)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from dfserve.model.bundle import build_network, load_bundle, save_bundle
from dfserve.model.config import (
    CRAFTER_ACTIONS,
    BundleConfig,
    DataConfig,
    NetworkConfig,
    SamplingConfig,
)
from dfserve.model.data.crafter import run_episode
from dfserve.model.evaluate import (
    EVAL_END,
    EVAL_START,
    EvalSettings,
    aggregate_psnr,
    best_tile_shift,
    evaluate,
    frame_stats,
    horizon_metrics,
    mean_psnr_gain,
    mse_per_frame,
    psnr_per_frame,
    spatial_detail,
    ssim_per_frame,
    stability,
    update_card,
    world_area,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g, dtype=torch.float64) * 0.8 + 0.1


def test_identical_frames():
    a = images()
    assert torch.isinf(psnr_per_frame(a, a)).all()
    assert aggregate_psnr(mse_per_frame(a, a)) == math.inf
    torch.testing.assert_close(ssim_per_frame(a, a), torch.ones(3, dtype=torch.float64))


def test_known_shift_and_noise_give_the_closed_form_psnr():
    a = images()
    assert psnr_per_frame(a, a + 0.1).tolist() == pytest.approx([20.0] * 3)  # MSE 0.01
    sign = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 2 - 1  # +-1 checker
    noisy = a + 0.05 * sign  # MSE 0.0025 exactly
    assert psnr_per_frame(a, noisy).tolist() == pytest.approx([10 * math.log10(400)] * 3)
    # aggregate over frames: one identical (MSE 0), one at MSE 0.01 -> mean 0.005, finite
    mse = mse_per_frame(a[:2], torch.stack([a[0], a[1] + 0.1]))
    assert aggregate_psnr(mse) == pytest.approx(10 * math.log10(200))


def test_ssim_closed_forms():
    # constant images: the structure terms are 1, SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a = torch.full((1, 3, 16, 16), 0.3, dtype=torch.float64)
    b = torch.full((1, 3, 16, 16), 0.7, dtype=torch.float64)
    c1 = 0.01**2
    assert float(ssim_per_frame(a, b)) == pytest.approx((2 * 0.21 + c1) / (0.09 + 0.49 + c1))
    # negated contrast around the mean: luminance 1, contrast 1, structure -1 (up to C2)
    x = images(1)
    y = 2 * x.mean() - x
    assert float(ssim_per_frame(x, y)) < -0.9
    # noise lowers SSIM monotonically
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
    s = [float(ssim_per_frame(x, x + sd * noise)) for sd in (0.01, 0.05, 0.2)]
    assert 1 > s[0] > s[1] > s[2]


def test_horizon_metrics_perfect_model_and_copy_last():
    truth = images(4 * 32).view(4, 32, 3, 32, 32)
    last = images(4, seed=9)
    m = horizon_metrics(truth.clone(), truth, last)
    assert list(m) == ["1", "4", "8", "16", "32"]
    for row in m.values():
        assert row["model"]["psnr"] == math.inf and row["model"]["ssim"] == pytest.approx(1.0)
        assert math.isfinite(row["copy_last"]["psnr"]) and row["model_beats_copy_last_psnr"]
    # a model that copies the last context frame scores exactly the baseline
    copy = last[:, None].expand(4, 32, 3, 32, 32)
    m = horizon_metrics(copy, truth, last)
    assert m["4"]["model"] == m["4"]["copy_last"] and not m["4"]["model_beats_copy_last_psnr"]
    assert mean_psnr_gain(copy, truth, last)["gain_db"] == 0.0


def test_mean_psnr_gain_averages_every_horizon_up_to_16():
    """Closed form: a model off by a constant 0.1 has PSNR 20 dB at every horizon; copy-last,
    off by 0.01 h at horizon h, has 40 - 20 log10(h); the gain is the mean over h = 1..16."""
    last = torch.full((2, 3, 8, 8), 0.5, dtype=torch.float64)
    steps = torch.arange(1, 33, dtype=torch.float64).view(1, 32, 1, 1, 1)
    truth = 0.5 + 0.01 * steps.expand(2, 32, 3, 8, 8)
    g = mean_psnr_gain(truth + 0.1, truth, last)
    expected_copy = sum(40 - 20 * math.log10(h) for h in range(1, 17)) / 16
    assert g["horizons"] == 16 and g["model"] == pytest.approx(20.0)
    assert g["copy_last"] == pytest.approx(expected_copy)
    assert g["gain_db"] == pytest.approx(20.0 - expected_copy)


def test_stability_in_range_and_collapsed():
    real = images(20)
    stats = frame_stats(real)
    ok = stability(real, stats)
    assert ok["fraction_inside"] == 1.0 and not ok["collapsed"]
    grey = torch.full((20, 3, 32, 32), 0.5, dtype=torch.float64)  # std 0: below every real frame
    bad = stability(grey, stats)
    assert bad["fraction_inside"] == 0.0 and bad["collapsed"] and bad["first_outside"] == 0
    drifting = torch.cat([real[:10], grey[:10]])
    mid = stability(drifting, stats)
    assert mid["fraction_inside"] == 0.5 and mid["collapsed"] and mid["first_outside"] == 10


@pytest.fixture(scope="module")
def crafter_episodes() -> list:
    return [run_episode(1_000_000 + i, steps=50) for i in range(2)]


def small_crafter_bundle(path: Path) -> Path:
    config = BundleConfig(
        name="eval-test",
        network=NetworkConfig(resolution=72, patch_size=8, width=32, depth=1, heads=2,
                              max_frames=8),
        data=DataConfig(n_frames=8, action_names=CRAFTER_ACTIONS),
        sampling=SamplingConfig(steps=2, chunk_size=4),
    )
    torch.manual_seed(0)
    net = build_network(config)
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    save_bundle(path, config, net, card=f"# eval-test\n\n{EVAL_START}\nold\n{EVAL_END}\n")
    return path


def test_evaluate_end_to_end_on_real_crafter(crafter_episodes, tmp_path):
    path = small_crafter_bundle(tmp_path / "bundle")
    bundle = load_bundle(path)
    settings = EvalSettings(episodes=2, windows_per_episode=1, frames=8, long_frames=12,
                            fidelity_episodes=1, fidelity_frames=3, grid_windows=2,
                            persistence_contexts=2, persistence_frames=10)  # fmt: skip
    out = tmp_path / "eval"
    result = evaluate(bundle, crafter_episodes, out, bundle.config.sampling, settings)
    doc = json.loads((out / "metrics.json").read_text())
    assert list(doc["horizons"]) == ["1", "4", "8"] and doc["windows"] == 2
    assert doc["mean_psnr_h1_16"]["horizons"] == 8  # the windows are 8 frames long
    for row in doc["horizons"].values():
        for who in ("model", "copy_last"):
            assert 0 < row[who]["psnr"] < 60 and -1 <= row[who]["ssim"] <= 1
    assert doc["stability"]["frames"] == 12
    fid = doc["action_fidelity"]
    assert len(fid["episodes"]) == 1 and fid["frames"] == 3
    # the env's own branches really differ: left and right lead to different frames
    assert fid["episodes"][0]["env_left_vs_env_right"] > 0
    moves = doc["move_fidelity"]
    assert moves["contexts"] == 2 and moves["left_vs_right_mse"]["env"] > 0
    assert 0 < moves["scrolling_cases"] <= 8  # 2 contexts x 4 moves, blocked ones don't count
    assert 0 <= moves["same_tile_shift"] <= moves["scrolling_cases"]
    with Image.open(out / "moves.png") as moves_png:
        assert moves_png.size[1] > 4 * 2 * 72  # 4 moves x (env + model)
    persist = doc["persistence"]
    assert persist["rollouts"] == 2 and persist["last_frames"] == 10
    assert 0 < persist["real_detail"] and 0 <= persist["ratio"]
    with Image.open(out / "grid.png") as grid:
        assert grid.size[1] > 2 * 2 * 72  # 2 windows x (truth row + rollout row), upscaled
    assert (out / "window_0.mp4").stat().st_size > 0 and (out / "long_rollout.mp4").is_file()
    update_card(path, result, out / "grid.png")
    card = (path / "README.md").read_text()
    assert "old" not in card and "| 1 |" in card and (path / "eval_grid.png").is_file()
    assert card.count(EVAL_START) == 1


def test_evaluation_rejects_too_short_episodes(tmp_path):
    path = small_crafter_bundle(tmp_path / "bundle")
    bundle = load_bundle(path)
    short = run_episode(1_000_000, steps=10)
    settings = dataclasses.replace(EvalSettings(), long_frames=0, fidelity_episodes=0)
    with pytest.raises(ValueError, match="held-out"):
        evaluate(bundle, [short], tmp_path / "e", bundle.config.sampling, settings)


def test_best_tile_shift_finds_a_scroll_by_whole_tiles():
    """A 72-px frame (8-px tiles) of random tiles, scrolled by known whole tiles: the best
    shift is exactly that scroll, whatever enters at the edge; a still frame reads (0, 0)."""
    g = torch.Generator().manual_seed(0)
    tiles = torch.rand(3, 20, 20, generator=g, dtype=torch.float64)
    world = tiles.repeat_interleave(8, 1).repeat_interleave(8, 2)  # (3, 160, 160)
    before = world[:, 40:112, 40:112]
    assert best_tile_shift(before, before) == (0, 0)
    for dy, dx in [(0, 1), (0, -1), (1, 0), (-1, 0), (2, -1)]:
        # the view moves by (-dy, -dx) tiles, so its content moves by (dy, dx)
        after = world[:, 40 - 8 * dy : 112 - 8 * dy, 40 - 8 * dx : 112 - 8 * dx]
        assert best_tile_shift(before, after) == (dy, dx)


def test_world_area_and_spatial_detail():
    frames = torch.zeros(2, 3, 72, 72, dtype=torch.float64)
    frames[1, :, :56:2] = 1.0  # stripes in the world area, nothing in the inventory rows
    frames[:, :, 56:] = torch.rand(2, 3, 16, 72, dtype=torch.float64)  # inventory noise
    assert world_area(frames).shape[-2:] == (56, 72)
    detail = spatial_detail(frames)
    assert detail[0] == 0 and detail[1] == pytest.approx(0.5, abs=0.01)
