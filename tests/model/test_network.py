"""The causal video DiT: block causality, translation invariance in time, cache equivalence."""

from __future__ import annotations

import torch

from dfserve.model.network import BatchKV


def inputs(net, frames: int = 6, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r = net.cfg.resolution
    x = torch.randn(batch, frames, 3, r, r, generator=g)
    levels = torch.randint(-1, 1000, (batch, frames), generator=g)
    actions = torch.randint(0, net.cfg.n_actions + 1, (batch, frames), generator=g)
    positions = torch.arange(frames).expand(batch, frames)
    return x, levels, actions, positions


def test_later_frames_and_actions_never_change_earlier_outputs(tiny_bundle):
    net = tiny_bundle.network
    x, levels, actions, positions = inputs(net)
    out, _, _ = net(x, levels, actions, positions)
    for j in range(1, 6):
        x2, l2, a2 = x.clone(), levels.clone(), actions.clone()
        x2[:, j:] += 1.0
        l2[:, j:] = (l2[:, j:] + 321) % 1000
        a2[:, j:] = (a2[:, j:] + 1) % net.cfg.n_actions
        out2, _, _ = net(x2, l2, a2, positions)
        torch.testing.assert_close(out2[:, :j], out[:, :j], atol=1e-6, rtol=0)
        assert (out2[:, j] - out[:, j]).abs().max() > 1e-4


def test_outputs_depend_on_frame_offsets_only(tiny_bundle):
    """RoPE over the global frame index: shifting every position by 1000 changes nothing."""
    net = tiny_bundle.network
    x, levels, actions, positions = inputs(net)
    out, _, _ = net(x, levels, actions, positions)
    shifted, _, _ = net(x, levels, actions, positions + 1000)
    torch.testing.assert_close(shifted, out, atol=2e-5, rtol=0)


def test_cached_prefix_equals_full_forward(tiny_bundle):
    net = tiny_bundle.network
    x, levels, actions, positions = inputs(net)
    full, keys, values = net(x, levels, actions, positions)
    n = net.cfg.tokens_per_frame * 4
    cache = BatchKV([k[:, :n] for k in keys], [v[:, :n] for v in values],
                    torch.ones(2, n, dtype=torch.bool))  # fmt: skip
    tail, _, _ = net(x[:, 4:], levels[:, 4:], actions[:, 4:], positions[:, 4:], cache=cache,
                     before=x[:, 3])  # fmt: skip
    torch.testing.assert_close(tail, full[:, 4:], atol=1e-5, rtol=0)


def test_padding_frames_do_not_leak(tiny_bundle):
    net = tiny_bundle.network
    x, levels, actions, positions = inputs(net, batch=1)
    out, _, _ = net(x[:, :4], levels[:, :4], actions[:, :4], positions[:, :4])
    valid = torch.tensor([[True] * 4 + [False] * 2])
    padded, _, _ = net(x, levels, actions, positions, frame_valid=valid)
    torch.testing.assert_close(padded[:, :4], out, atol=1e-5, rtol=0)


def test_frame_skip_sees_the_previous_frame_only(tiny_bundle):
    """With frame stacking, frame t's patches include frame t-1's input: a forward that
    starts mid-window must be given that input (`before`), and zeros mean a window start."""
    net = tiny_bundle.network
    assert net.cfg.frame_skip
    x, levels, actions, positions = inputs(net)
    with_before, _, _ = net(x[:, 1:], levels[:, 1:], actions[:, 1:], positions[:, 1:],
                            before=x[:, 0])  # fmt: skip
    without, _, _ = net(x[:, 1:], levels[:, 1:], actions[:, 1:], positions[:, 1:])
    assert (with_before[:, 0] - without[:, 0]).abs().max() > 1e-4


def test_copy_shifts_choose_a_shifted_previous_frame(tiny_bundle):
    """copy_shifts: with a zero residual and one gate logit far above the others, the output
    is the previous frame's input moved by exactly that choice's patch offset."""
    import copy

    from dfserve.model.network import COPY_SHIFTS, shift_frames

    net = copy.deepcopy(tiny_bundle.network)
    assert net.cfg.copy_shifts
    P, C = net.cfg.patch_size, net.cfg.channels
    x, levels, actions, positions = inputs(net, frames=3)
    for k, (dy, dx) in enumerate(COPY_SHIFTS):
        with torch.no_grad():
            net.final.weight.zero_()
            bias = torch.zeros(P * P * C + P * P * net.copy_choices)
            bias[P * P * C :].view(P * P, net.copy_choices)[:, k] = 50.0  # choose copy k
            net.final.bias.copy_(bias)
            out, _, _ = net(x, levels, actions, positions)
        expected = shift_frames(x[:, :2], dy * P, dx * P)  # frame t copies frame t-1's input
        torch.testing.assert_close(out[:, 1:], expected, atol=1e-5, rtol=0)


def test_copy_action_prior_picks_the_shift_per_action(tiny_bundle):
    """copy_action_prior: with the network's own gate logits at zero, a frame's action alone
    chooses which shifted copy it gets (here action 1 -> moved right, 2 -> moved left)."""
    import copy

    from dfserve.model.network import COPY_SHIFTS, shift_frames

    net = copy.deepcopy(tiny_bundle.network)
    P = net.cfg.patch_size
    x, levels, _, positions = inputs(net, frames=3, batch=1)
    with torch.no_grad():
        net.final.weight.zero_()
        net.final.bias.zero_()
        net.copy_prior.weight.zero_()
        net.copy_prior.weight[1, COPY_SHIFTS.index((0, 1))] = 50.0
        net.copy_prior.weight[2, COPY_SHIFTS.index((0, -1))] = 50.0
        out, _, _ = net(x, levels, torch.tensor([[0, 1, 2]]), positions)
    torch.testing.assert_close(out[:, 1], shift_frames(x[:, 0], 0, P), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 2], shift_frames(x[:, 1], 0, -P), atol=1e-5, rtol=0)
