"""The rollout engine: KV cache exactness, causality, determinism, batch independence."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from dfserve.model.bundle import Bundle
from dfserve.model.config import SCHEDULES, SamplingConfig
from dfserve.model.rollout import KVCache, RolloutEngine, RolloutRequest

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5  # float32 reduction-order noise is ~1e-6; any real semantic difference is larger
# Cache vs recompute in float64: the two differ only in summation order, so they must agree far
# below float32 noise (which on some CPUs reaches 3e-5 once guidance amplifies it).
TOL64 = 1e-10


@pytest.fixture(scope="module")
def tiny_bundle64(tiny_bundle: Bundle) -> Bundle:
    return dataclasses.replace(tiny_bundle, network=copy.deepcopy(tiny_bundle.network).double())


def make_request(bundle: Bundle, frames: int = 14, seed: int = 0, **sampling) -> RolloutRequest:
    g = torch.Generator().manual_seed(seed + 100)
    r = bundle.config.network.resolution
    context = torch.rand(2, 3, r, r, generator=g) * 2 - 1
    actions = tuple(int(a) for a in torch.randint(0, 4, (frames,), generator=g))
    base = dataclasses.replace(bundle.config.sampling, **sampling)
    return RolloutRequest(context, actions, base, seed=seed)


def run(bundle: Bundle, request: RolloutRequest, use_cache: bool = True) -> torch.Tensor:
    frames = list(RolloutEngine(bundle, use_cache=use_cache).rollout(request))
    assert [i for i, _ in frames] == list(range(request.frames))
    return torch.stack([f for _, f in frames])


def run_together(bundle: Bundle, requests: list[RolloutRequest], use_cache: bool
                 ) -> list[torch.Tensor]:
    """The rollouts stepped in one batch, as the worker steps them; their frames each."""
    engine = RolloutEngine(bundle, use_cache=use_cache)
    states = [engine.start(r) for r in requests]
    frames: list[list[tuple[int, torch.Tensor]]] = [[] for _ in requests]
    while not all(st.done for st in states):
        for got, new in zip(frames, engine.step(states), strict=True):
            got.extend(new)
    for got, request in zip(frames, requests, strict=True):
        assert [i for i, _ in got] == list(range(request.frames))
    return [torch.stack([f for _, f in got]) for got in frames]


SAMPLERS = ["ddim", "ddpm", "dpmpp_2m"]
CONTEXT_MODES = ["relabel", "noised"]
GUIDANCE = [1.0, 2.5]
# 2 context + 14 frames with chunk 3 in a window of 8: the history slides five times
SLIDES = {(schedule, sampler): {"schedule": schedule, "sampler": sampler, "eta": 0.7}
          for schedule in SCHEDULES for sampler in SAMPLERS}  # fmt: skip
MODES = {(mode, guidance): {"context_noise_mode": mode, "guidance": guidance, "chunk_size": 2}
         for mode in CONTEXT_MODES for guidance in GUIDANCE}  # fmt: skip


@pytest.fixture(scope="module")
def cache_vs_recompute(tiny_bundle64: Bundle) -> dict[tuple, tuple[torch.Tensor, torch.Tensor]]:
    """Every case of the two sweeps below, cached and recomputed, in one batch per engine: one
    forward pass serves all sixteen cases at once. A rollout's frames do not depend on its
    batch (test_batched_at_different_stages_equals_alone), so each case is its rollout alone,
    in a batch that mixes rollouts at different rows, chunks and forward sizes on top."""
    cases = {**SLIDES, **MODES}
    requests = [make_request(tiny_bundle64, **sampling) for sampling in cases.values()]
    cached = run_together(tiny_bundle64, requests, use_cache=True)
    recomputed = run_together(tiny_bundle64, requests, use_cache=False)
    return dict(zip(cases, zip(cached, recomputed, strict=True), strict=True))


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_cache_equals_recompute_across_window_slides(cache_vs_recompute, schedule, sampler):
    cached, recomputed = cache_vs_recompute[schedule, sampler]
    assert cached.dtype == torch.float64
    torch.testing.assert_close(cached, recomputed, atol=TOL64, rtol=0)


@pytest.mark.parametrize("mode", CONTEXT_MODES)
@pytest.mark.parametrize("guidance", GUIDANCE)
def test_cache_equals_recompute_context_modes_and_guidance(cache_vs_recompute, mode, guidance):
    cached, recomputed = cache_vs_recompute[mode, guidance]
    torch.testing.assert_close(cached, recomputed, atol=TOL64, rtol=0)


def test_cache_equals_recompute_in_float32(tiny_bundle):
    """The served dtype too, at float32's tolerance."""
    request = make_request(tiny_bundle)
    cached, recomputed = run(tiny_bundle, request, True), run(tiny_bundle, request, False)
    torch.testing.assert_close(cached, recomputed, atol=TOL, rtol=0)


def test_a_stale_rolling_cache_would_be_caught(tiny_bundle, monkeypatch):
    """Guard against a test that cannot fail: a rolling cache that drops the oldest frames
    when the window slides but keeps the other keys (computed with a longer history, as the
    real-time demos do) must give different frames from the recompute reference."""
    n = tiny_bundle.config.network.tokens_per_frame

    def roll_without_recompute(cache: KVCache, start: int) -> None:
        drop = (start - cache.start) * n
        kept = (cache.end - cache.start) * n - drop
        cache.keys[:, :kept] = cache.keys[:, drop : drop + kept].clone()
        cache.values[:, :kept] = cache.values[:, drop : drop + kept].clone()
        cache.start = start

    request = make_request(tiny_bundle)
    monkeypatch.setattr(KVCache, "reset", roll_without_recompute)
    stale = run(tiny_bundle, request, True)
    monkeypatch.undo()
    assert (stale - run(tiny_bundle, request, False)).abs().max() > 5 * TOL


def test_same_seed_same_frames_and_other_seed_differs(tiny_bundle):
    a = run(tiny_bundle, make_request(tiny_bundle, seed=5))
    b = run(tiny_bundle, make_request(tiny_bundle, seed=5))
    assert torch.equal(a, b)
    c = run(tiny_bundle, make_request(tiny_bundle, seed=6))
    assert (a - c).abs().max() > 1e-3


def test_batched_at_different_stages_equals_alone(tiny_bundle):
    requests = [
        make_request(tiny_bundle, frames=9, seed=1, sampler="ddpm"),
        make_request(tiny_bundle, frames=5, seed=2, schedule="autoregressive", steps=3),
        make_request(tiny_bundle, frames=12, seed=3, schedule="trapezoid", guidance=2.0),
    ]
    alone = [run(tiny_bundle, r) for r in requests]
    engine = RolloutEngine(tiny_bundle)
    states, outputs = [], [[] for _ in requests]
    # rollout k joins after 3k rows: the batch mixes rollouts at different rows and chunks
    for row in range(200):
        if row % 3 == 0 and len(states) < len(requests):
            states.append(engine.start(requests[len(states)]))
        for k, frames in enumerate(engine.step(states)):
            outputs[k].extend(f for _, f in frames)
        if len(states) == len(requests) and all(s.done for s in states):
            break
    for k, expected in enumerate(alone):
        torch.testing.assert_close(torch.stack(outputs[k]), expected, atol=TOL, rtol=0)


def test_changing_a_later_action_never_changes_earlier_frames(tiny_bundle):
    request = make_request(tiny_bundle, frames=10, sampler="ddpm", eta=1.0)
    base = run(tiny_bundle, request)
    for k in (1, 4, 8):
        actions = list(request.actions)
        actions[k] = (actions[k] + 1) % 4
        changed = run(tiny_bundle, dataclasses.replace(request, actions=tuple(actions)))
        assert torch.equal(changed[:k], base[:k]), f"frames before {k} changed"
        assert (changed[k] - base[k]).abs().max() > 1e-4, f"action {k} had no effect"


def test_frames_are_finite_and_in_range_for_long_rollouts(tiny_bundle):
    """The engine hands out x0 unclamped (RolloutEngine.step), so a random model's frames
    leave [-1, 1] (about ±4 here) from the first window on. What a long rollout must keep is
    its range: 32 frames (eight chunks) on, its values stay within 1.5x the first window's and
    each frame's spread within 2x of theirs. A rollout that feeds its own growth back leaves
    both (history amplified 2x reaches ±47), one that collapses to a flat image the second."""
    frames = run(tiny_bundle, make_request(tiny_bundle, frames=40, chunk_size=4))
    assert torch.isfinite(frames).all()
    assert frames.shape == (40, 3, 16, 16)
    window = tiny_bundle.config.network.max_frames
    first, last = frames[:window], frames[-window:]  # (window, C, R, R) each, 32 frames apart
    bound = float(first.abs().max())
    assert float(last.abs().max()) <= 1.5 * bound, (float(last.abs().max()), bound)
    spread = first.std(dim=(1, 2, 3))  # (window,) per-frame pixel std
    lo, hi = float(spread.min()) / 2, float(spread.max()) * 2
    assert all(lo <= float(s) <= hi for s in last.std(dim=(1, 2, 3))), (lo, hi)


def test_validation_names_the_field(tiny_bundle):
    engine = RolloutEngine(tiny_bundle)
    bad = {"schedule": "zigzag", "sampler": "euler", "steps": 0, "chunk_size": 8, "eta": 2.0}
    for field, value in bad.items():
        with pytest.raises(ValueError, match=field):
            engine.start(make_request(tiny_bundle, **{field: value}))
    request = make_request(tiny_bundle)
    with pytest.raises(ValueError, match="actions"):
        engine.start(dataclasses.replace(request, actions=(0, 9)))
    with pytest.raises(ValueError, match="context"):
        engine.start(dataclasses.replace(request, context=torch.zeros(7, 3, 16, 16)))


def test_sampling_config_defaults_are_valid(tiny_bundle):
    SamplingConfig().validate(16, 1000)
    tiny_bundle.config.sampling.validate(8, 1000)


def test_extending_action_by_action_equals_all_actions_up_front(tiny_bundle):
    """Interactive play: with chunk_size 1, frames generated as actions arrive one at a time
    equal the frames of the same rollout with every action known from the start."""
    request = make_request(tiny_bundle, frames=9, chunk_size=1, sampler="ddpm")
    expected = run(tiny_bundle, request)
    engine = RolloutEngine(tiny_bundle)
    state = engine.start(dataclasses.replace(request, actions=request.actions[:1]))
    got = []
    for k in range(request.frames):
        if k:
            engine.extend(state, [request.actions[k]])
        while len(got) <= k:
            got.extend(f for _, f in engine.step([state])[0])
    torch.testing.assert_close(torch.stack(got), expected, atol=TOL, rtol=0)


def test_long_rollouts_keep_only_the_window_in_memory(tiny_bundle):
    engine = RolloutEngine(tiny_bundle)
    state = engine.start(make_request(tiny_bundle, frames=60))
    while not state.done:
        engine.step([state])
        assert len(state.clean) <= tiny_bundle.config.network.max_frames
    assert state.dropped > 40


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_network_keeps_float32_sampler_state(tiny_bundle, dtype):
    """bf16/fp16 weights and KV caches (the GPU fast path), float32 sampler state: frames stay
    float32, finite, and close to the float32 rollout's."""
    half = dataclasses.replace(tiny_bundle, network=copy.deepcopy(tiny_bundle.network).to(dtype))
    cache = RolloutEngine(half).start(make_request(half)).cache
    assert cache is not None and cache.keys.dtype == dtype
    got = run(half, make_request(half))
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    reference = run(tiny_bundle, make_request(tiny_bundle))
    psnr = 10 * torch.log10(4 / (got - reference).pow(2).mean())  # frames span [-1, 1]
    assert psnr > 30, float(psnr)


@pytest.mark.parametrize("context_noise", [15, -1])
def test_cache_equals_recompute_when_frames_see_the_previous_level(tiny_bundle, context_noise):
    """previous_level: the first frame after the cached history is told its stacked frame's
    level through before_level; it must be the level a recompute gives that frame (the context
    level), or the cache would change the samples."""
    from dfserve.model.bundle import build_network

    network = dataclasses.replace(tiny_bundle.config.network, previous_level=True)
    config = dataclasses.replace(tiny_bundle.config, network=network)
    torch.manual_seed(0)
    net = build_network(config).double()
    with torch.no_grad():  # untrained weights with every conditioning path switched on
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    bundle = Bundle(config, net)
    request = make_request(bundle, context_noise=context_noise)
    torch.testing.assert_close(run(bundle, request, True), run(bundle, request, False),
                               atol=TOL64, rtol=0)  # fmt: skip
