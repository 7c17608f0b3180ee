"""The scroll head (model.scroll): the data's scrolls as labels, the scrolled copy, the head's
choice inside the network, cache equivalence, and that training teaches the head the action."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from dfserve.model.config import preset, train_preset
from dfserve.model.network import BatchKV, CausalVideoDiT
from dfserve.model.scroll import COPY_SHIFTS, scroll_labels, scroll_view, shift_frames
from dfserve.model.train import Trainer, diffusion_loss

TINY = preset("tiny")
# 16 px, 4-px patches: a 4x4 grid of patches whose top 3 rows scroll and whose last row stays
SCROLLING = dataclasses.replace(
    TINY, network=dataclasses.replace(TINY.network, copy_shifts=False, copy_action_prior=False,
                                      previous_level=True, scroll_rows=3),
    diffusion=dataclasses.replace(TINY.diffusion, objective="x0"),
)  # fmt: skip
P, ROWS, R = 4, 3, 16
MOVES = {0: 0, 1: COPY_SHIFTS.index((0, 1)), 2: COPY_SHIFTS.index((0, -1)),
         3: COPY_SHIFTS.index((1, 0))}  # fmt: skip  # tiny's actions noop/left/right/up


def walk(scrolls: list[int], seed: int = 0) -> torch.Tensor:
    """(A, 3, R, R) frames whose top ROWS patch rows are a window onto a bigger random world,
    moved by COPY_SHIFTS[scrolls[t]] from frame t-1 to frame t; the bottom row never moves."""
    g = torch.Generator().manual_seed(seed)
    world = torch.rand(3, 8 * R, 8 * R, generator=g) * 2 - 1
    status = torch.rand(3, R - ROWS * P, R, generator=g) * 2 - 1
    y = x = 4 * R
    frames = []
    for k in scrolls:
        dy, dx = COPY_SHIFTS[k]
        y, x = y - dy * P, x - dx * P  # the view moves against the content
        frames.append(torch.cat([world[:, y : y + ROWS * P, x : x + R], status], dim=1))
    return torch.stack(frames)


def test_labels_are_the_data_scrolls_and_a_uniform_view_is_still():
    scrolls = [0, 1, 1, 3, 0, 2, 4, 4]
    frames = walk(scrolls)
    assert scroll_labels(frames[None], P, ROWS)[0].tolist() == [0] + scrolls[1:]
    flat = torch.zeros(1, 3, 3, R, R)
    flat[:, 1:, :, ROWS * P :] = torch.rand(2, 3, R - ROWS * P, R)  # only the status changes
    assert scroll_labels(flat, P, ROWS).tolist() == [[0, 0, 0]]


def test_scroll_view_moves_the_view_and_keeps_the_rows_below():
    frames = walk([0, 0, 0])[None]
    for k, (dy, dx) in enumerate(COPY_SHIFTS):
        moved = scroll_view(frames, torch.full((1, 3), k), P, ROWS)
        view = shift_frames(frames[..., : ROWS * P, :], dy * P, dx * P)
        torch.testing.assert_close(moved[..., : ROWS * P, :], view, atol=0, rtol=0)
        torch.testing.assert_close(moved[..., ROWS * P :, :], frames[..., ROWS * P :, :])


def scroll_net(seed: int = 0) -> CausalVideoDiT:
    torch.manual_seed(seed)
    return CausalVideoDiT(SCROLLING.network, SCROLLING.diffusion.timesteps).eval()


def copy_all(net: CausalVideoDiT) -> None:
    """Zero residual, gate fully open: the output is exactly the copied frame."""
    with torch.no_grad():
        net.final.weight.zero_()
        net.final.bias.zero_()
        net.final.bias[P * P * 3 :] = 50.0


def inputs(frames: torch.Tensor, actions: list[int]):
    B, A = frames.shape[:2]
    levels = torch.full((B, A), 15)
    return frames, levels, torch.tensor([actions] * B), torch.arange(A).expand(B, A)


def test_the_network_copies_the_given_scroll_or_else_the_heads_choice():
    net = scroll_net()
    copy_all(net)
    frames = walk([0, 1, 3, 2])[None]
    x, levels, actions, positions = inputs(frames, [0, 1, 3, 2])
    given = torch.tensor([[0, 1, 3, 2]])
    with torch.no_grad():
        out, _, _ = net(x, levels, actions, positions, scrolls=given)
        previous = net.previous_frames(x, None)
        torch.testing.assert_close(out, scroll_view(previous, given, P, ROWS), atol=1e-5, rtol=0)
        torch.testing.assert_close(out[:, 1, ..., : ROWS * P, P:], x[:, 1, ..., : ROWS * P, P:],
                                   atol=1e-5, rtol=0)  # fmt: skip  # frame 1 scrolled right
        for k in range(len(COPY_SHIFTS)):  # no scrolls given: the head's most likely one
            net.scroll_head.out[1].bias.zero_()
            net.scroll_head.out[1].bias[k] = 1e4
            chosen, _, _ = net(x, levels, actions, positions)
            expected = scroll_view(previous, torch.full((1, 4), k), P, ROWS)
            torch.testing.assert_close(chosen, expected, atol=1e-5, rtol=0)


def test_a_fresh_network_copies_the_scrolled_frame():
    """The gate starts open: before any training the output is the scrolled previous frame
    (times sigmoid(COPY_OPEN_LOGIT)), so a frame is copied unless the data says otherwise."""
    from dfserve.model.network import COPY_OPEN_LOGIT

    net = scroll_net()
    frames = walk([0, 1, 3])[None]
    x, levels, actions, positions = inputs(frames, [0, 1, 3])
    given = torch.tensor([[0, 1, 3]])
    with torch.no_grad():
        out, _, _ = net(x, levels, actions, positions, scrolls=given)
    copied = scroll_view(net.previous_frames(x, None), given, P, ROWS)
    torch.testing.assert_close(out, torch.sigmoid(torch.tensor(COPY_OPEN_LOGIT)) * copied)


def test_cached_prefix_equals_full_forward_with_the_scroll_head():
    net = scroll_net()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 3, R, R, generator=g)
    levels = torch.randint(-1, 1000, (2, 6), generator=g)
    actions = torch.randint(0, 5, (2, 6), generator=g)
    positions = torch.arange(6).expand(2, 6)
    with torch.no_grad():
        full, keys, values = net(x, levels, actions, positions)
        n = net.cfg.tokens_per_frame * 4
        cache = BatchKV([k[:, :n] for k in keys], [v[:, :n] for v in values],
                        torch.ones(2, n, dtype=torch.bool))  # fmt: skip
        tail, _, _ = net(x[:, 4:], levels[:, 4:], actions[:, 4:], positions[:, 4:], cache=cache,
                         before=x[:, 3], before_level=levels[:, 3])  # fmt: skip
    torch.testing.assert_close(tail, full[:, 4:], atol=1e-5, rtol=0)


def test_training_teaches_the_head_which_way_each_action_scrolls():
    """Windows where noop stays and left/right/up scroll their way: after a short run the head
    predicts the scroll from a clean previous frame and the action alone (chance is 1 in 5)."""
    gen = torch.Generator().manual_seed(0)
    trainer = Trainer(SCROLLING, dataclasses.replace(train_preset("tiny"), lr=3e-3))

    def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        actions = torch.randint(0, 4, (8, 8), generator=gen)
        frames = [walk([MOVES[int(a)] for a in row], seed * 100 + i)
                  for i, row in enumerate(actions)]  # fmt: skip
        return torch.stack(frames), actions

    for step in range(60):
        trainer.step(*batch(step))
    x0, actions = batch(10_000)
    labels = scroll_labels(x0, P, ROWS)
    with torch.no_grad():
        logits = trainer.net.eval().scroll_logits(x0, torch.full(actions.shape, -1), actions)
    accuracy = (logits[:, 1:].argmax(-1) == labels[:, 1:]).float().mean()
    assert accuracy > 0.9
    loss, drawn = diffusion_loss(trainer.net, trainer.ns, x0, actions, trainer.train, gen)
    assert torch.equal(drawn["scrolls"], labels) and torch.isfinite(loss)


def test_scroll_rows_needs_the_single_copy_gate():
    bad = dataclasses.replace(SCROLLING.network, copy_shifts=True)
    with pytest.raises(ValueError, match="scroll_rows"):
        CausalVideoDiT(bad, 1000)
    assert copy.deepcopy(scroll_net()).scroll_head is not None


def test_the_extra_head_pairs_train_the_head_alone():
    """scroll_batch's pairs: labelled by the data's scroll of their second frame, and their
    loss reaches the scroll head's weights only (it shares none with the denoiser)."""
    from dfserve.model.train import scroll_head_loss

    trainer = Trainer(SCROLLING, dataclasses.replace(train_preset("tiny"), clean_history=0.5))
    pairs = torch.stack([walk([0, MOVES[a]], seed=a) for a in (1, 2, 3, 0)])
    loss = scroll_head_loss(trainer.net, trainer.ns, pairs, torch.tensor([[0, a] for a in
                            (1, 2, 3, 0)]), trainer.train, torch.Generator().manual_seed(0))
    loss.backward()
    touched = {n.split(".")[0] for n, p in trainer.net.named_parameters()
               if p.grad is not None and p.grad.abs().sum() > 0}  # fmt: skip
    assert torch.isfinite(loss) and touched == {"scroll_head"}


CONVEX = dataclasses.replace(SCROLLING.network, convex_copy=True)


def test_a_convex_copy_at_an_open_gate_is_the_copy_whatever_the_residual():
    """gate * copy + (1 - gate) * residual: an open gate copies exactly, where the sum
    residual + gate * copy is off by the residual (the fading the convex blend removes)."""
    frames = walk([0, 1, 3])[None]
    x, levels, actions, positions = inputs(frames, [0, 1, 3])
    given = torch.tensor([[0, 1, 3]])
    outs = {}
    for convex in (False, True):
        torch.manual_seed(0)
        net = CausalVideoDiT(dataclasses.replace(CONVEX, convex_copy=convex), 1000).eval()
        with torch.no_grad():
            torch.nn.init.normal_(net.final.weight, std=0.5)  # a residual far from 0
            net.final.bias[P * P * 3 :] = 50.0
            outs[convex], _, _ = net(x, levels, actions, positions, scrolls=given)
    copied = scroll_view(net.previous_frames(x, None), given, P, ROWS)
    torch.testing.assert_close(outs[True], copied, atol=1e-6, rtol=0)
    assert (outs[False] - copied).abs().mean() > 0.1


def test_convex_copy_needs_the_single_copy_gate():
    with pytest.raises(ValueError, match="convex_copy"):
        CausalVideoDiT(dataclasses.replace(CONVEX, copy_shifts=True, scroll_rows=0), 1000)
    with pytest.raises(ValueError, match="convex_copy"):
        CausalVideoDiT(dataclasses.replace(CONVEX, copy_gate=False, scroll_rows=0), 1000)


def test_gate_targets_are_the_pixels_where_the_copy_is_exact():
    from dfserve.model.train import GATE_EXACT, gate_targets

    x0 = torch.zeros(1, 1, 3, 2, 2)
    copy_ = x0.clone()
    copy_[0, 0, 1, 0, 0] = 2 * GATE_EXACT  # one channel off: the pixel is not exact
    copy_[0, 0, :, 1, 1] = GATE_EXACT / 2  # every channel near: it is
    assert gate_targets(copy_, x0).tolist() == [[[[0.0, 1.0], [1.0, 1.0]]]]


def test_the_gate_loss_teaches_the_gate_where_the_copy_is_exact():
    """Steps on one batch of walks, with and without the gate loss: the gate's cross-entropy
    against where its copy is exact (after a clean frame: the view but not the entering row;
    after a noisy one: nowhere) ends well below what the x0 loss alone teaches."""
    from dfserve.model.train import gate_loss

    actions = torch.tensor([[0, 1, 3, 2]] * 4)
    x0 = torch.stack([walk([MOVES[int(a)] for a in row], i) for i, row in enumerate(actions)])
    levels = torch.tensor([[-1, 500, -1, 500], [-1, 900, 900, 900]] * 2)  # clean or noisy
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))

    def trained_gate_loss(weight: float) -> float:
        torch.manual_seed(0)
        train = dataclasses.replace(train_preset("tiny"), lr=3e-3, clean_frames=0.5,
                                    gate_loss=weight)  # fmt: skip
        trainer = Trainer(dataclasses.replace(SCROLLING, network=CONVEX), train)
        for _ in range(60):
            trainer.step(x0, actions)
        gates: list[torch.Tensor] = []
        with torch.no_grad():
            trainer.net.eval()(trainer.ns.q_sample(x0, levels, noise), levels, actions,
                               torch.arange(4).expand(4, 4), scrolls=scroll_labels(x0, P, ROWS),
                               gates=gates)  # fmt: skip
        return float(gate_loss(gates[0], gates[1], x0, torch.ones(4, 4, dtype=torch.bool)))

    with_it, without = trained_gate_loss(1.0), trained_gate_loss(0.0)
    assert with_it < 0.7 * without, (with_it, without)  # 0.25 vs 0.46 when written


def test_a_warm_start_may_switch_the_convex_copy_on(tmp_path):
    """The convex blend changes how the output is formed, not the weights: a run of the convex
    recipe starts from a bundle trained without it, and any other difference is refused."""
    from dfserve.model.bundle import save_bundle

    save_bundle(tmp_path / "scroll", SCROLLING, scroll_net())
    trainer = Trainer(dataclasses.replace(SCROLLING, network=CONVEX), train_preset("tiny"))
    trainer.warm_start(tmp_path / "scroll")
    for k, v in scroll_net().state_dict().items():
        assert torch.equal(trainer.net.state_dict()[k], v), k
    wider = dataclasses.replace(CONVEX, width=2 * CONVEX.width)
    with pytest.raises(ValueError, match="same architecture"):
        Trainer(dataclasses.replace(SCROLLING, network=wider),
                train_preset("tiny")).warm_start(tmp_path / "scroll")  # fmt: skip
