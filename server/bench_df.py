"""`dfserve bench` figures for a bundle whose network is not causal in time (the imported DF v1.5
U-Net): the engine against the research code's own sampling loop, on the same CPU in one run.

The research loop (df_base.validation_step of buoyancy99/diffusion-forcing) is re-expressed
here literally: one video at a time, every row of the scheduling matrix runs the whole sliding
window (context relabelled and scaled, frames that do not move left as they are), DDIM from x0.
No cache is possible for this network (GroupNorm spans the window, see model/unet3d.py), so
the engine's advantage is batching rollouts into one forward and nothing else; the frames of
both loops are compared, so the figure is only reported when they agree.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from dfserve.model.bundle import Bundle
from dfserve.model.frame_stack import frame_stack, image_channels, stack, stacked_count, unstack
from dfserve.model.rollout import RolloutEngine, RolloutRequest
from dfserve.model.samplers import SamplerState, draw_noise, sampler_step
from dfserve.model.scheduling import scheduling_matrix
from dfserve.server.bench_rollouts import run_concurrent, timed, timed_call

STEPS = 4  # DDIM steps per frame for the timing (the DMLab config's 100 scale it linearly)


def requests(bundle: Bundle, n: int, frames: int) -> list[RolloutRequest]:
    """n rollouts from random context frames, with the bundle's sampling at STEPS steps."""
    c = bundle.config
    g = torch.Generator().manual_seed(0)
    r, k = c.network.resolution, c.data.context_length
    s = replace(c.sampling, steps=STEPS)
    return [RolloutRequest(torch.rand(k, image_channels(c), r, r, generator=g) * 2 - 1,
                           (c.network.n_actions,) * frames, s, seed=i)
            for i in range(n)]  # fmt: skip


@torch.no_grad()
def research_loop(bundle: Bundle, request: RolloutRequest, device: torch.device) -> Tensor:
    """One video through the reference's validation loop; the generated frames (F, C, R, R).
    With frame_stack k it runs on stacked frames and unstacks at the end, as the reference."""
    net, cfg, s, k = bundle.network, bundle.config, request.sampling, frame_stack(bundle.config)
    schedule, window = bundle.schedule, cfg.network.max_frames
    gen = torch.Generator().manual_seed(request.seed)  # the engine's noise, drawn in its order
    levels_of = schedule.sampling_levels(s.steps).to(device)
    context = stack(request.context.to(device), k)
    xs = list(context)
    ctx_level = torch.tensor([s.context_noise], device=device)
    total, curr = len(context) + stacked_count(request.frames, k), len(context)
    while curr < total:
        h = min(s.chunk_size, total - curr)
        xs += list(draw_noise(torch.Size((h, *context.shape[1:])), gen,
                              cfg.diffusion.clip_noise, context))  # fmt: skip
        start = max(0, curr + h - window)
        matrix = torch.from_numpy(scheduling_matrix(s.schedule, s.steps, h, s.uncertainty_scale))
        for m in range(len(matrix) - 1):
            clean = torch.full((curr - start,), -1, device=device)
            frm = torch.cat([clean, levels_of[matrix[m].to(device)]])
            to = torch.cat([clean, levels_of[matrix[m + 1].to(device)]])
            x = torch.stack(xs[start:])
            scaled = schedule.q_sample(x, ctx_level.expand(len(x)), torch.zeros_like(x))
            inp = torch.where((frm < 0).view(-1, 1, 1, 1), scaled, x)
            labels = torch.where(frm < 0, ctx_level, frm)
            out, _, _ = net(inp[None].to(next(net.parameters()).dtype), labels[None])
            x0 = schedule.to_x0(out[0].to(x.dtype), inp, labels)
            # DDIM: the reference's sampler, stateless (a fresh state: no dpmpp history)
            x, _ = sampler_step(s.sampler, schedule, x, x0, frm, to, SamplerState(), s.eta, gen)
            xs[start:] = list(x)
        curr += h
    return unstack(torch.stack(xs[len(context) :]), k)[: request.frames]


def unet_figures(bundle: Bundle, device: torch.device, quick: bool) -> dict[str, Any]:
    k = frame_stack(bundle.config)  # whole stacked frames, as the reference's loop makes
    frames, batch = (2 * k, 2) if quick else (4 * k, 4)
    engine = RolloutEngine(bundle, device)
    one = requests(bundle, 1, frames)[0]
    research_loop(bundle, requests(bundle, 1, 1)[0], device)  # warm-up
    ref_frames, t_ref = timed_call(lambda: research_loop(bundle, one, device), device)
    ours, t_one = timed_call(lambda: torch.stack([f for _, f in engine.rollout(one)]), device)
    agree = float((ours.cpu() - ref_frames.cpu()).abs().max())
    many = requests(bundle, batch, frames)
    t_batch = timed(lambda: run_concurrent(engine, many), device)
    return {
        "architecture": bundle.config.architecture,
        "timing_steps": STEPS,
        "kv_cache": "none: the network is not causal in time (GroupNorm spans the window)",
        "research_loop_fps": frames / t_ref,
        "single_stream_fps": frames / t_one,
        "engine_vs_research_loop_max_abs_diff": agree,
        f"aggregate_fps_{batch}": batch * frames / t_batch,
        f"speedup_vs_research_loop_{batch}_rollouts": (batch * frames / t_batch)
        / (frames / t_ref),
    }
