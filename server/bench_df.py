"""`dfserve bench`: the engine against the research code's own sampling loop, on the same model
and machine in one run, for either architecture.

The research loop (df_base.validation_step of buoyancy99/diffusion-forcing) is re-expressed
here literally: one video at a time, every row of the scheduling matrix runs the whole sliding
window (context relabelled and scaled, frames that do not move left as they are), no cache, no
batching. The frames of both loops are compared, so the figure says whether it compares like
with like.

For a network that is not causal in time (the imported DF v1.5 U-Net) no cache is possible
(GroupNorm spans the window, see model/unet3d.py), so the engine's advantage is batching
rollouts into one forward and nothing else (unet_figures, timed at STEPS DDIM steps). For the
causal DiT the engine also runs only the frames a row needs, from a KV cache (dit_loop_figures,
at the bundle's default sampling).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from dfserve.model.bundle import Bundle
from dfserve.model.config import SamplingConfig
from dfserve.model.flops import ForwardFlops
from dfserve.model.frame_stack import frame_stack, image_channels, stack, stacked_count, unstack
from dfserve.model.rollout import RolloutEngine, RolloutRequest
from dfserve.model.samplers import SamplerState, draw_noise, sampler_step
from dfserve.model.scheduling import scheduling_matrix
from dfserve.server.bench_rollouts import make_request, run_concurrent, timed, timed_call

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
    With frame_stack k it runs on stacked frames and unstacks at the end, as the reference.

    Either architecture: the DiT gets each frame's action and global index (the U-Net ignores
    both), and a finished frame is the network's input as the request's context_noise_mode
    makes it. The sampler's state lives for the rows of one chunk: stateless DDIM (the
    reference's sampler) ignores it, dpmpp_2m (the DiT bundles' default) needs it.

    Frame counts that are a multiple of chunk_size give the engine's frames (a shorter last
    chunk sees more history here, as in the reference: start_frame = curr + horizon - n_tokens)."""
    net, cfg, s, k = bundle.network, bundle.config, request.sampling, frame_stack(bundle.config)
    schedule, window = bundle.schedule, cfg.network.max_frames
    gen = torch.Generator().manual_seed(request.seed)  # the engine's noise, drawn in its order
    levels_of = schedule.sampling_levels(s.steps).to(device)
    context = stack(request.context.to(device), k)
    xs = list(context)
    actions = frame_actions(bundle, request, len(context)).to(device)
    ctx_level = torch.tensor([s.context_noise], device=device)
    total, curr = len(context) + stacked_count(request.frames, k), len(context)
    while curr < total:
        h = min(s.chunk_size, total - curr)
        xs += list(draw_noise(torch.Size((h, *context.shape[1:])), gen,
                              cfg.diffusion.clip_noise, context))  # fmt: skip
        start = max(0, curr + h - window)
        positions = torch.arange(start, curr + h, device=device)
        matrix = torch.from_numpy(scheduling_matrix(s.schedule, s.steps, h, s.uncertainty_scale))
        state = SamplerState()
        for m in range(len(matrix) - 1):
            clean = torch.full((curr - start,), -1, device=device)
            frm = torch.cat([clean, levels_of[matrix[m].to(device)]])
            to = torch.cat([clean, levels_of[matrix[m + 1].to(device)]])
            x = torch.stack(xs[start:])
            inp = torch.where((frm < 0).view(-1, 1, 1, 1), context_input(bundle, x, s), x)
            labels = torch.where(frm < 0, ctx_level, frm)
            out, _, _ = net(inp[None].to(next(net.parameters()).dtype), labels[None],
                            actions[None, start : curr + h], positions[None])  # fmt: skip
            x0 = schedule.to_x0(out[0].to(x.dtype), inp, labels)
            x, state = sampler_step(s.sampler, schedule, x, x0, frm, to, state, s.eta, gen)
            xs[start:] = list(x)
        curr += h
    return unstack(torch.stack(xs[len(context) :]), k)[: request.frames]


def frame_actions(bundle: Bundle, request: RolloutRequest, n_context: int) -> Tensor:
    """The conditioning action of every network frame, context first, as the engine has them:
    the null action for context without actions, and everywhere with frame_stack (the U-Net
    has no action input)."""
    null = bundle.config.network.n_actions
    if frame_stack(bundle.config) > 1:
        return torch.full((n_context + request.frames,), null)
    context = request.context_actions or (null,) * n_context
    return torch.tensor(context + request.actions)


def context_input(bundle: Bundle, x: Tensor, s: SamplingConfig) -> Tensor:
    """Finished frames as the network sees them: relabelled (as they are) or scaled (DF v1.5's
    stabilization, sqrt(alpha_bar) x at the context level, no noise)."""
    if s.context_noise_mode == "relabel" or s.context_noise < 0:
        return x
    if s.context_noise_mode == "noised":  # the engine draws that noise in an order of its own
        raise ValueError("research_loop: context_noise_mode 'noised' is not reproduced")
    level = torch.full((len(x),), s.context_noise, device=x.device)
    return bundle.schedule.q_sample(x, level, torch.zeros_like(x))


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


def dit_loop_figures(bundle: Bundle, device: torch.device, quick: bool) -> dict[str, Any]:
    """The engine against the research loop on the causal DiT at the bundle's default sampling:
    one stream, and 8 rollouts batched, each over the research loop's one stream. Whole chunks
    only, so both loops see the same windows (research_loop's docstring)."""
    frames = bundle.config.sampling.chunk_size * (2 if quick else 6)
    engine = RolloutEngine(bundle, device)
    one = make_request(bundle, frames)
    research_loop(bundle, make_request(bundle, 1), device)  # warm-up
    run_concurrent(engine, [make_request(bundle, 1)])
    with ForwardFlops(engine.net) as work:
        ref_frames, t_ref = timed_call(lambda: research_loop(bundle, one, device), device)
    ours, t_one = timed_call(lambda: torch.stack([f for _, f in engine.rollout(one)]), device)
    many = [make_request(bundle, frames, seed=i) for i in range(8)]
    t_batch = timed(lambda: run_concurrent(engine, many), device)
    research_fps = frames / t_ref
    return {
        "research_loop_fps": research_fps,
        "research_loop_gflops_per_frame": work.flops / frames / 1e9,
        "engine_vs_research_loop_max_abs_diff": float((ours.cpu() - ref_frames.cpu()).abs().max()),
        "reference_loop_speedup": {
            "single_stream": frames / t_one / research_fps,
            "8_rollouts": 8 * frames / t_batch / research_fps,
        },
    }
