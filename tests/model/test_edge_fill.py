"""The edge fill: tile geometry against shift_frames, the codebook against known clusters, and
in the engine: only entering slots change, a seed fixes the draws, the cache stays exact."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from dfserve.model.bundle import Bundle, build_network, load_bundle, save_bundle
from dfserve.model.config import BundleConfig, preset, train_preset
from dfserve.model.edge_fill import (
    EdgeFill,
    entering_slots,
    fit_codebook,
    frame_scroll,
    nearest_code,
    paste_tiles,
    view_tiles,
)
from dfserve.model.scroll import COPY_SHIFTS, shift_frames
from dfserve.model.train import Trainer
from dfserve.model.train_edge_fill import train_edge_fill
from tests.model.test_rollout import TOL64, make_request, run
from tests.model.test_train import write_synthetic

pytestmark = pytest.mark.usefixtures("one_thread")

P, ROWS, COLS = 4, 3, 4  # a 16-px frame: 4x4 tiles of 4 px, the top 3 rows scroll


def test_view_tiles_are_the_frame_blocks_and_paste_inverts_them():
    frame = torch.randn(2, 3, 16, 16)
    tiles = view_tiles(frame, P, ROWS)
    assert tiles.shape == (2, ROWS * COLS, P * P * 3)
    r, c = 2, 1
    block = frame[:, :, r * P : (r + 1) * P, c * P : (c + 1) * P]  # (B, C, py, px)
    torch.testing.assert_close(tiles[:, r * COLS + c], block.permute(0, 2, 3, 1).flatten(1))
    torch.testing.assert_close(paste_tiles(torch.zeros_like(frame), tiles, P, ROWS)[..., :12, :],
                               frame[..., :12, :])  # fmt: skip
    assert paste_tiles(torch.zeros_like(frame), tiles, P, ROWS)[..., 12:, :].eq(0).all()


@pytest.mark.parametrize("scroll", range(len(COPY_SHIFTS)))
def test_entering_slots_are_what_a_shift_leaves_empty(scroll):
    dy, dx = COPY_SHIFTS[scroll]
    moved = shift_frames(torch.ones(3, ROWS * P, 16), dy * P, dx * P)
    empty = view_tiles(moved, P, ROWS).eq(0).all(-1)
    assert torch.equal(entering_slots(scroll, ROWS, COLS), empty)


@pytest.mark.parametrize("scroll", range(len(COPY_SHIFTS)))
def test_frame_scroll_reads_the_shift_back(scroll):
    g = torch.Generator().manual_seed(scroll)
    previous = torch.rand(3, 16, 16, generator=g) * 2 - 1
    dy, dx = COPY_SHIFTS[scroll]
    frame = previous.clone()
    frame[:, : ROWS * P] = shift_frames(previous[:, : ROWS * P], dy * P, dx * P)
    assert frame_scroll(previous, frame, P, ROWS) == scroll


def test_a_uniform_view_reads_as_still():
    frame = torch.zeros(3, 16, 16)
    assert frame_scroll(frame, frame.clone(), P, ROWS) == 0


def test_codebook_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[-1.0] * 8, [0.0] * 8, [1.0] * 8])
    tiles = means.repeat(200, 1) + 0.01 * torch.randn(600, 8, generator=g)
    centres = fit_codebook(tiles, 3)
    found = centres[centres[:, 0].argsort()]
    torch.testing.assert_close(found, means, atol=0.005, rtol=0)
    assert torch.equal(nearest_code(tiles, centres), nearest_code(means.repeat(200, 1), centres))


def scrolling_config(edge_fill: bool) -> BundleConfig:
    """`tiny` with a scrolling view: a scroll head and a convex copy, and with edge_fill an
    edge fill of 8 codes and the copy decided at sampling time."""
    base = preset("tiny")
    network = dataclasses.replace(base.network, copy_shifts=False, copy_action_prior=False,
                                  previous_level=True, scroll_rows=ROWS, convex_copy=True,
                                  edge_fill_codes=8 if edge_fill else 0,
                                  exact_copy_above=0.5 if edge_fill else 0.0)  # fmt: skip
    return dataclasses.replace(base, name="tiny-edges" if edge_fill else "tiny-scroll",
                               network=network)  # fmt: skip


def scrolling_fill_bundle(edge_fill: bool) -> Bundle:
    """scrolling_config with a convex copy gate held open and the scroll pinned to one step
    right, plus random weights everywhere else: most generated frames scroll, so the edge
    fill has edges to fill. float64, for the cache comparison."""
    config = scrolling_config(edge_fill)
    torch.manual_seed(0)
    net = build_network(config).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        assert net.scroll_head is not None
        net.scroll_head.out[1].bias.copy_(torch.tensor([0.0, 50.0, 0.0, 0.0, 0.0]))
        gate = net.final.bias[P * P * 3 :]
        gate.fill_(50.0)  # the copy, not the drawing
        if net.edge_fill is not None:
            codes = torch.linspace(-1, 1, 8, dtype=torch.float64)[:, None].expand(8, P * P * 3)
            net.edge_fill.head.codebook.copy_(codes)
    return Bundle(config, net.eval())


@pytest.fixture(scope="module")
def fill_bundles() -> tuple[Bundle, Bundle]:
    return scrolling_fill_bundle(False), scrolling_fill_bundle(True)


def test_only_entering_slots_change_and_they_come_from_the_codebook(fill_bundles):
    plain, filled = fill_bundles
    head = filled.network.edge_fill
    assert isinstance(head, EdgeFill)
    generator = torch.Generator().manual_seed(0)
    g = torch.Generator().manual_seed(1)
    previous = torch.rand(3, 16, 16, generator=g, dtype=torch.float64) * 2 - 1
    frame = previous.clone()
    frame[:, : ROWS * P] = shift_frames(previous[:, : ROWS * P], 0, P)  # the view moved right
    out = head.fill(previous, frame, generator)
    changed = (view_tiles(out, P, ROWS) != view_tiles(frame, P, ROWS)).any(-1)
    assert torch.equal(changed, entering_slots(1, ROWS, COLS))  # the left column, only
    codes = head.head.codebook
    entered = view_tiles(out, P, ROWS)[entering_slots(1, ROWS, COLS)]
    assert all((codes == tile).all(-1).any() for tile in entered)
    torch.testing.assert_close(out[:, ROWS * P :], frame[:, ROWS * P :], atol=0, rtol=0)
    still = head.fill(previous, previous.clone(), generator)
    assert torch.equal(still, previous)


def test_rollouts_draw_edges_per_seed_and_the_cache_stays_exact(fill_bundles, monkeypatch):
    plain, filled = fill_bundles
    request = make_request(filled, frames=12)
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    fill = EdgeFill.fill

    def spy(self, previous, frame, generator):
        out = fill(self, previous, frame, generator)
        calls.append((previous, out))
        return out

    monkeypatch.setattr(EdgeFill, "fill", spy)
    frames = run(filled, request, True)
    # every frame handed out is the fill's output, given the frame handed out before it
    assert len(calls) == len(frames)
    previous = [request.context[-1].to(frames.dtype), *frames[:-1]]
    for (seen, out), before, frame in zip(calls, previous, frames, strict=True):
        assert torch.equal(seen, before) and torch.equal(out, frame)
    torch.testing.assert_close(frames, run(filled, request, False), atol=TOL64, rtol=0)
    assert torch.equal(frames, run(filled, request, True))  # a seed fixes the draws
    assert not torch.equal(frames, run(filled, dataclasses.replace(request, seed=1), True))
    assert not torch.equal(frames, run(plain, request, True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_reduced_precision_bundle_fills_edges_too(fill_bundles, dtype):
    """bf16/fp16 weights (a GPU's default): the head takes the float32 frames the sampler
    keeps, and the frames stay float32 and finite."""
    _, filled = fill_bundles
    half = dataclasses.replace(filled, network=copy.deepcopy(filled.network).to(dtype))
    frames = run(half, make_request(half, frames=6), True)
    assert frames.dtype == torch.float32 and torch.isfinite(frames).all()


# --- training (model.train_edge_fill) on the synthetic data of test_train ------------------


@pytest.fixture(scope="module")
def denoiser_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = scrolling_config(False)
    return save_bundle(tmp_path_factory.mktemp("denoiser") / "b", config, build_network(config))


@pytest.fixture(scope="module")
def edge_data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("edges")
    return write_synthetic(root / "train", 4, 0), write_synthetic(root / "heldout", 2, 1000)


def test_edge_fill_training_keeps_the_denoiser_and_learns_the_edges(denoiser_dir, edge_data,
                                                                      tmp_path):  # fmt: skip
    train, heldout = edge_data
    config = scrolling_config(True)
    out = tmp_path / "filled"
    summary = train_edge_fill(config, denoiser_dir, train, out, heldout, minutes=5,
                              steps_limit=60)  # fmt: skip
    assert summary["steps"] == summary["total_steps"] == 60 and summary["warm_start"] is None
    # the synthetic world is mostly background: the view's other tiles tell it from the square
    assert summary["heldout"]["cross_entropy"] < summary["heldout"]["frequencies_cross_entropy"]
    filled, denoiser = load_bundle(out), load_bundle(denoiser_dir)
    assert filled.config.network == config.network
    for key, value in denoiser.network.state_dict().items():
        assert torch.equal(filled.network.state_dict()[key], value), key
    assert filled.network.edge_fill.head.codebook.abs().sum() > 0
    assert (out / "examples").is_dir() or not (denoiser_dir / "examples").is_dir()
    again = train_edge_fill(config, out, train, tmp_path / "again", minutes=5, steps_limit=5)
    assert again["warm_start"] == {"from": str(out), "steps": 60} and again["total_steps"] == 65
    torch.testing.assert_close(load_bundle(tmp_path / "again").network.edge_fill.head.codebook,
                               filled.network.edge_fill.head.codebook)  # fmt: skip
    card = (tmp_path / "again" / "README.md").read_text()  # the block rewritten, not repeated
    assert card.count("## Edge fill") == 1 and "65 steps in all" in card


def test_edge_fill_training_refuses_another_denoiser(tiny_bundle_dir, edge_data, tmp_path):
    with pytest.raises(ValueError, match="more than the edge fill"):
        train_edge_fill(scrolling_config(True), tiny_bundle_dir, edge_data[0], tmp_path / "x",
                        minutes=1, steps_limit=1)  # fmt: skip
    with pytest.raises(ValueError, match="no edge fill"):
        train_edge_fill(scrolling_config(False), tiny_bundle_dir, edge_data[0], tmp_path / "x",
                        minutes=1, steps_limit=1)  # fmt: skip


def test_a_denoiser_warm_starts_from_a_bundle_with_an_edge_fill(denoiser_dir, edge_data,
                                                                 tmp_path):  # fmt: skip
    """The shipped default has an edge fill; its denoiser must still warm-start a new run."""
    out = tmp_path / "filled"
    train_edge_fill(scrolling_config(True), denoiser_dir, edge_data[0], out, minutes=1,
                    steps_limit=1)  # fmt: skip
    trainer = Trainer(scrolling_config(False), train_preset("tiny"))
    trainer.warm_start(out)
    for key, value in load_bundle(denoiser_dir).network.state_dict().items():
        assert torch.equal(trainer.net.state_dict()[key], value), key
