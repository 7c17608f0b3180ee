"""The engine under failure and at the edges of its settings (issue 13): a step that raises
leaves every rollout as it was, and a pyramid with more uncertainty than steps makes frames."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dfserve.model import rollout as rollout_module
from dfserve.model.bundle import Bundle
from dfserve.model.rollout import RolloutEngine, RolloutRequest, RolloutState

pytestmark = pytest.mark.usefixtures("one_thread")


def make_request(bundle: Bundle, frames: int, seed: int, **sampling: object) -> RolloutRequest:
    g = torch.Generator().manual_seed(seed + 100)
    r = bundle.config.network.resolution
    context = torch.rand(2, 3, r, r, generator=g) * 2 - 1
    actions = tuple(int(a) for a in torch.randint(0, 4, (frames,), generator=g))
    return RolloutRequest(context, actions, dataclasses.replace(bundle.config.sampling,
                                                                **sampling), seed=seed)


def alone(engine: RolloutEngine, request: RolloutRequest) -> list[tuple[int, torch.Tensor]]:
    return list(engine.rollout(request))


class Injected(RuntimeError):
    pass


def test_a_step_that_fails_after_the_forward_changes_no_rollout(tiny_bundle, monkeypatch):
    """A batched step fails in the second rollout's sampler, after the forward and after the
    first rollout's update. The worker then steps each rollout alone (server/worker.py); the
    frames must be exactly those of a run that never failed: no row done twice, no frame
    handed out by the failed call and lost, no noise drawn twice."""
    engine = RolloutEngine(tiny_bundle)
    # ddpm draws noise at every row and chunk_size 2 commits cached frames mid-chunk: a
    # half-applied step would show in all three (sampler, generator, cache).
    requests = [make_request(tiny_bundle, 6, seed, sampler="ddpm", chunk_size=2)
                for seed in (1, 2)]  # fmt: skip
    expected = [alone(engine, r) for r in requests]

    real_step = rollout_module.sampler_step
    calls = {"n": 0}

    def second_call_fails(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Injected("the second rollout's sampler fails")
        return real_step(*args, **kwargs)

    states = [engine.start(r) for r in requests]
    got: list[list[tuple[int, torch.Tensor]]] = [[], []]
    failures = 0
    while not all(st.done for st in states):
        calls["n"] = 0
        monkeypatch.setattr(rollout_module, "sampler_step", second_call_fails)
        try:
            outputs = engine.step(states)
        except Injected:
            failures += 1
            monkeypatch.setattr(rollout_module, "sampler_step", real_step)
            outputs = [engine.step([st])[0] for st in states]  # the worker's fallback
        for mine, out in zip(got, outputs, strict=True):
            mine += out
    assert failures > 0
    for mine, want in zip(got, expected, strict=True):
        assert [i for i, _ in mine] == [i for i, _ in want]
        torch.testing.assert_close(torch.stack([f for _, f in mine]),
                                   torch.stack([f for _, f in want]), atol=0, rtol=0)


def test_a_failed_step_restores_the_state_exactly(tiny_bundle, monkeypatch):
    """The same, field by field, with the failure in the forward's conversion to x0, in the
    step that starts the second chunk (so the set-up before the forward, which draws the new
    chunk's noise and moves the history, has to be undone too)."""
    engine = RolloutEngine(tiny_bundle)
    state = engine.start(make_request(tiny_bundle, 4, 3, sampler="ddpm", chunk_size=2))
    engine.step([state])
    assert state.matrix is not None
    while state.row < state.matrix.shape[0] - 1:  # to the end of the first chunk
        engine.step([state])
    assert not state.done and state.chunk_start == state.n_context
    before = _snapshot(state)

    def fail(*args, **kwargs):
        raise Injected("to_x0 fails")

    monkeypatch.setattr(engine.schedule, "to_x0", fail)
    with pytest.raises(Injected):
        engine.step([state])
    after = _snapshot(state)
    assert after.keys() == before.keys()
    for name, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[name]), name
        else:
            assert value == after[name], name


def _snapshot(st: RolloutState) -> dict[str, object]:
    assert st.cache is not None
    return {"row": st.row, "rows_done": st.rows_done, "emitted": st.emitted,
            "chunk_start": st.chunk_start, "inputs": len(st.inputs), "clean": len(st.clean),
            "chunk_x": st.chunk_x.clone() if st.chunk_x is not None else None,
            "finished": [t is not None for t in st.chunk_clean],
            "generator": st.generator.get_state(),
            "cache": (st.cache.start, st.cache.end)}  # fmt: skip


def test_uncertainty_scale_above_steps_makes_the_autoregressive_frames(tiny_bundle):
    """Pyramid with u > S: between frames there are rows in which nothing moves (no forward
    to run). It is the autoregressive schedule with idle rows, so the frames are its frames."""
    engine = RolloutEngine(tiny_bundle)
    wide = alone(engine, make_request(tiny_bundle, 4, 5, schedule="pyramid", steps=2,
                                      uncertainty_scale=511.0, chunk_size=4, sampler="ddim",
                                      eta=0.0))
    ar = alone(engine, make_request(tiny_bundle, 4, 5, schedule="autoregressive", steps=2,
                                    chunk_size=4, sampler="ddim", eta=0.0))
    assert [i for i, _ in wide] == [0, 1, 2, 3]
    torch.testing.assert_close(torch.stack([f for _, f in wide]),
                               torch.stack([f for _, f in ar]), atol=0, rtol=0)
