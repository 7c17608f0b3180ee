"""The analytic FLOP count of model/flops.py against torch's own counter on real forwards.

FlopCounterMode counts matrix products only (mm, addmm, bmm, attention kernels it knows), the
same work model/flops.py counts, so the two must agree exactly. On the CPU it has no formula for
the fused attention kernels that F.scaled_dot_product_attention and nn.TransformerEncoderLayer's
inference fast path pick, so the forwards here run the math backend and no fast path: the
same products, spelled as bmm's that it counts (masked scores included).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dfserve.model.bundle import Bundle, build_network
from dfserve.model.config import preset
from dfserve.model.flops import ForwardFlops, forward_flops
from dfserve.model.network import BatchKV, CausalVideoDiT
from dfserve.model.rollout import RolloutEngine
from dfserve.server.bench_rollouts import make_request, run_concurrent

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def countable() -> Iterator[None]:
    """Attention as bmm's that FlopCounterMode sees (see the module docstring)."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    with sdpa_kernel(SDPBackend.MATH):
        yield
    torch.backends.mha.set_fastpath_enabled(before)


def counted(fn: object) -> int:
    mode = FlopCounterMode(display=False)
    with mode, torch.no_grad():
        fn()  # type: ignore[operator]
    return mode.get_total_flops()


def random_cache(net: CausalVideoDiT, batch: int, frames: int) -> BatchKV:
    n = net.cfg
    shape = (batch, frames * n.tokens_per_frame, n.heads, n.width // n.heads)
    keys = [torch.randn(shape) for _ in range(n.depth)]
    values = [torch.randn(shape) for _ in range(n.depth)]
    return BatchKV(keys, values, torch.ones(shape[:2], dtype=torch.bool))


@pytest.mark.usefixtures("countable")
@pytest.mark.parametrize("name", ["tiny", "crafter-cpu"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("cached_frames", [0, 3])
@pytest.mark.parametrize("padded", [True, False])
def test_forward_flops_equal_torchs_count(name: str, batch: int, cached_frames: int,
                                          padded: bool) -> None:  # fmt: skip
    """A padded batch attends through one masked call, a dense one frame by frame."""
    torch.manual_seed(0)
    net = build_network(preset(name)).eval()
    n, frames = net.cfg, 2
    x = torch.randn(batch, frames, n.channels, n.resolution, n.resolution)
    levels = torch.randint(0, net.timesteps, (batch, frames))
    actions = torch.randint(0, n.n_actions + 1, (batch, frames))
    positions = cached_frames + torch.arange(frames).repeat(batch, 1)
    valid = torch.ones(batch, frames, dtype=torch.bool)
    valid[0, -1] = not padded  # a padded frame costs as much as a real one
    cache = random_cache(net, batch, cached_frames) if cached_frames else None

    torch_count = counted(lambda: net(x, levels, actions, positions, valid, cache))
    assert forward_flops(n, batch, frames, cached_frames, not padded) == torch_count


def test_cached_keys_and_more_frames_cost_more() -> None:
    """Attention grows with the keys attended to, everything with the frames (a sanity check
    that the count is not a constant that happens to match)."""
    cfg = preset("crafter-cpu").network
    base = forward_flops(cfg, 1, 2, 0)
    assert forward_flops(cfg, 1, 2, 4) > base
    assert forward_flops(cfg, 2, 2, 0) == 2 * base  # nothing is shared across the batch
    assert forward_flops(cfg, 1, 4, 0) > 2 * base  # the scores grow quadratically


@pytest.mark.usefixtures("countable")
def test_counting_a_rollout_sees_every_forward_the_engine_runs(tiny_bundle: Bundle) -> None:
    """ForwardFlops on the engine's network (cached rows, window rebuilds, a batch of
    rollouts of different lengths, so padded groups) counts what torch counts."""
    engine = RolloutEngine(tiny_bundle)
    requests = [make_request(tiny_bundle, frames, seed=i) for i, frames in enumerate((7, 4))]
    with ForwardFlops(engine.net) as hooked:
        torch_count = counted(lambda: run_concurrent(engine, requests))
    assert hooked.forwards > 2
    assert hooked.flops == torch_count
