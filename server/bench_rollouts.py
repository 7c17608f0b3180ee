"""What every part of `dfserve bench` times, and how: a request from the bundle's example, the
worker's way of stepping rollouts together, and a clock that waits for the GPU.

bench.py (engine and sampler figures), bench_service.py (the real service against the bare
engine) and bench_df.py (the engine against the research loop) all import it, so none of them
imports another.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import torch

from dfserve.model.bundle import Bundle
from dfserve.model.rollout import RolloutEngine, RolloutRequest

T = TypeVar("T")


def make_request(bundle: Bundle, frames: int, seed: int = 0, **sampling: Any) -> RolloutRequest:
    """A rollout from the first bundled example (or grey frames) with cycling actions."""
    cfg = bundle.config
    examples = bundle.examples()
    if examples:
        ex = next(iter(examples.values()))
        context = torch.from_numpy(ex.context).permute(0, 3, 1, 2).float() / 127.5 - 1
        actions = ex.actions or (0,)
    else:
        r = cfg.network.resolution
        context = torch.zeros(cfg.data.context_length, cfg.network.channels, r, r)
        actions = (0,)
    s = replace(cfg.sampling, **sampling)
    context = context[-(cfg.network.max_frames - s.chunk_size) :]
    cycled = tuple(actions[i % len(actions)] for i in range(frames))
    return RolloutRequest(context, cycled, s, seed=seed)


def run_concurrent(engine: RolloutEngine, requests: list[RolloutRequest]) -> int:
    """Step all rollouts together until done (the worker's batching); frames produced."""
    states = [engine.start(r) for r in requests]
    produced = 0
    while not all(s.done for s in states):
        produced += sum(len(f) for f in engine.step(states))
    return produced


def timed_call(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """fn's value and its seconds; CUDA work is asynchronous, so the clock waits for it."""
    _sync(device)
    start = time.perf_counter()
    value = fn()
    _sync(device)
    return value, time.perf_counter() - start


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """The seconds fn takes (see timed_call)."""
    return timed_call(fn, device)[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
