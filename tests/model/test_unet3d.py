"""UNet3D (the research code's Unet3D): shapes, what it conditions on, why it has no cache.

Parity with the reference itself is in test_df_import.py; these tests pin the properties the
rollout engine relies on, on a small random U-Net in float64.
"""

from __future__ import annotations

import pytest
import torch

from dfserve.model.bundle import Bundle
from dfserve.model.config import BundleConfig, NetworkConfig, SamplingConfig, UNet3DConfig
from dfserve.model.rollout import RolloutEngine, RolloutRequest
from dfserve.model.unet3d import UNet3D

NET = NetworkConfig(resolution=16, channels=3, max_frames=6, n_actions=0)
CFG = UNet3DConfig(dim=8, dim_mults=(1, 2), attn_resolutions=(16, 8), attn_heads=2,
                   attn_dim_head=8)  # fmt: skip


@pytest.fixture(scope="module")
def unet(one_thread: None) -> UNet3D:
    torch.manual_seed(0)
    net = UNet3D(NET, CFG).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return net


def inputs(B: int = 2, F: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, F, 3, 16, 16, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 1000, (B, F), generator=g)


@torch.no_grad()
def test_shapes_and_level_conditioning(unet: UNet3D) -> None:
    x, levels = inputs()
    out, keys, values = unet(x, levels)
    assert out.shape == x.shape and keys == [] and values == []
    other = levels.clone()
    other[:, 2] = (other[:, 2] + 500) % 1000
    changed = (unet(x, other)[0] - out).abs().amax(dim=(2, 3, 4))  # (B, F)
    assert (changed > 1e-6).all()  # through GroupNorm, one frame's level reaches every frame


@torch.no_grad()
def test_not_causal_in_time_so_no_exact_cache(unet: UNet3D) -> None:
    """The temporal attention is causal, but GroupNorm statistics span every frame: changing
    the last frame changes the first frame's output. A KV cache of finished frames would
    therefore not reproduce the recomputed window, and the engine does not use one."""
    x, levels = inputs()
    out = unet(x, levels)[0]
    y = x.clone()
    y[:, -1] += 1.0
    assert (unet(y, levels)[0][:, 0] - out[:, 0]).abs().max() > 1e-4
    assert UNet3D.causal is False


@torch.no_grad()
def test_rollouts_do_not_depend_on_the_batch(unet: UNet3D) -> None:
    x, levels = inputs(B=3)
    together = unet(x, levels)[0]
    alone = torch.cat([unet(x[b : b + 1], levels[b : b + 1])[0] for b in range(3)])
    assert (together - alone).abs().max() < 1e-10


@torch.no_grad()
def test_window_position_does_not_matter(unet: UNet3D) -> None:
    """Frames are numbered from the window's start (as the reference does), whatever the
    global positions the engine passes."""
    x, levels = inputs()
    base = unet(x, levels, positions=torch.arange(5).expand(2, 5))[0]
    moved = unet(x, levels, positions=torch.arange(5).expand(2, 5) + 37)[0]
    assert torch.equal(base, moved)


def test_padding_and_caches_are_refused(unet: UNet3D) -> None:
    x, levels = inputs()
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1, -1] = False
    with pytest.raises(ValueError, match="GroupNorm"):
        unet(x, levels, frame_valid=valid)
    with pytest.raises(ValueError, match="no KV cache"):
        unet(x, levels, cache=object())


def test_engine_batches_unet_rollouts_of_different_lengths(unet: UNet3D) -> None:
    """Rollouts at different stages (window still filling vs full) are batched without padding
    and give the same frames as alone."""
    config = BundleConfig(name="u", architecture="unet3d", network=NET, unet=CFG,
                          sampling=SamplingConfig(steps=2, chunk_size=2, sampler="ddim",
                                                  context_noise=14,
                                                  context_noise_mode="scaled"))  # fmt: skip
    bundle = Bundle(config, unet)
    g = torch.Generator().manual_seed(3)
    contexts = [torch.rand(k, 3, 16, 16, generator=g) * 2 - 1 for k in (1, 4)]
    requests = [RolloutRequest(c, (0,) * 5, config.sampling, seed=i)
                for i, c in enumerate(contexts)]  # fmt: skip
    engine = RolloutEngine(bundle)
    alone = [torch.stack([f for _, f in engine.rollout(r)]) for r in requests]
    states = [engine.start(r) for r in requests]
    together: list[list[torch.Tensor]] = [[], []]
    while not all(s.done for s in states):
        for b, out in enumerate(engine.step(states)):
            together[b].extend(f for _, f in out)
    for b in range(2):
        assert (torch.stack(together[b]) - alone[b]).abs().max() < 1e-10
