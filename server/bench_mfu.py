"""`dfserve bench`'s model FLOP utilisation (DESIGN §8): the matmul FLOP/s the engine achieves on
the causal DiT over this machine's peak matmul FLOP/s, both measured in the same run.

The model's FLOPs are counted analytically (model/flops.py) over the forwards the engine really
runs (a hook on its network: cached rows, window rebuilds, padding), so `mfu` says how much of
the machine the serving loop turns into model work; what it loses is everything else (the
elementwise ops, the Python of a row, small matmuls that do not reach the peak).
"""

from __future__ import annotations

from typing import Any

import torch

from dfserve.model.bundle import Bundle
from dfserve.model.flops import ForwardFlops
from dfserve.model.rollout import RolloutEngine
from dfserve.server.bench_rollouts import make_request, run_concurrent, timed

# A GEMM large enough to reach the peak: 2048 keeps the CPU's few seconds short, a GPU needs
# bigger tiles to fill its units.
PEAK_SIZE = {"cpu": 2048, "cuda": 8192}


def peak_matmul_flops(dtype: torch.dtype, device: torch.device, repeats: int = 3) -> float:
    """FLOP/s of a large square matmul in the serving dtype at the current thread count: warm,
    best of `repeats` (the least disturbed run on a shared machine)."""
    n = PEAK_SIZE.get(device.type, PEAK_SIZE["cpu"])
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)  # warm-up: thread pools, cuBLAS handles, clocks
    best = min(timed(lambda: torch.mm(a, b), device) for _ in range(repeats))
    return 2 * n**3 / best


def mfu_figures(bundle: Bundle, device: torch.device, quick: bool) -> dict[str, Any]:
    """`mfu` for 1, 8 and 32 rollouts stepped together (the worker's batching), the model's
    GFLOPs per generated frame of one stream, and the peak they are measured against."""
    engine = RolloutEngine(bundle, device)
    peak = peak_matmul_flops(engine.net_dtype, device)
    frames = 8 if quick else 32
    run_concurrent(engine, [make_request(bundle, 4)])  # warm-up
    out: dict[str, Any] = {"peak_matmul_gflops": peak / 1e9, "mfu": {}}
    for n in (1, 8, 32):
        per = frames if n <= 8 else max(4, frames // 4)  # 32 long rollouts would take minutes
        flops, seconds = counted_run(engine, n, per, device)
        out["mfu"][str(n)] = flops / seconds / peak
        if n == 1:
            out["model_gflops_per_frame"] = flops / per / 1e9
    return out


def counted_run(engine: RolloutEngine, n: int, frames: int,
                device: torch.device) -> tuple[int, float]:  # fmt: skip
    """The model FLOPs and seconds of n rollouts of `frames` frames stepped together."""
    requests = [make_request(engine.bundle, frames, seed=i) for i in range(n)]
    with ForwardFlops(engine.net) as work:
        seconds = timed(lambda: run_concurrent(engine, requests), device)
    return work.flops, seconds
