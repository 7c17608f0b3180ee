"""Turn user-facing rollout parameters into a validated RolloutRequest.

Shared by `dfserve rollout --local`, the API and the worker, so every entry point accepts and
rejects exactly the same things. `resolve` checks and fills in everything without touching a
tensor (the API stores its result with the job); `rollout_request` makes the engine's request
from it (the worker, and `prepare`, which does both). Errors are FieldErrors naming the
offending field; the API maps them to 422.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dfserve.model.bundle import action_index, unconditional
from dfserve.model.config import BundleConfig, SamplingConfig, sampling_types
from dfserve.model.errors import FieldError
from dfserve.model.frame_stack import check_context_frames, frame_stack, max_context_frames
from dfserve.model.rollout import RolloutRequest

SAMPLING_FIELDS = tuple(sampling_types())


@dataclass(frozen=True)
class ResolvedRequest:
    """A request checked against a model, defaults filled in, before any tensor is made."""

    context: np.ndarray  # uint8 (K, R, R, 3), trimmed to the frames the model can see
    actions: tuple[int, ...]  # one per generated frame
    context_actions: tuple[int, ...] | None
    sampling: SamplingConfig
    seed: int
    notes: tuple[str, ...]  # what was changed on the way (trimmed context, cycled or cut actions)


@dataclass(frozen=True)
class PreparedRequest:
    request: RolloutRequest
    notes: tuple[str, ...]


def sampling_from(config: BundleConfig, overrides: dict[str, Any]) -> SamplingConfig:
    """The bundle's defaults with the given fields replaced; None means 'use the default'."""
    values = {f: getattr(config.sampling, f) for f in SAMPLING_FIELDS}
    for key, value in overrides.items():
        if key not in values:
            raise FieldError(key, "unknown sampling setting", list(values))
        if value is not None:
            values[key] = _coerce(key, value, type(values[key]))
    sampling = SamplingConfig(**values)
    sampling.validate(config.network.max_frames, config.diffusion.timesteps)
    return sampling


def prepare(
    config: BundleConfig,
    context: np.ndarray,
    actions: list[str | int] | None = None,
    frames: int | None = None,
    sampling: dict[str, Any] | None = None,
    seed: int = 0,
    context_actions: list[str | int] | None = None,
    max_frames: int | None = None,
) -> PreparedRequest:
    """context: uint8 (K, R, R, 3) at the model's resolution."""
    r = resolve(config, context, actions, frames, sampling, seed, context_actions, max_frames)
    request = rollout_request(config, r.context, r.actions, r.sampling, r.seed,
                              r.context_actions)
    return PreparedRequest(request, r.notes)


def resolve(
    config: BundleConfig,
    context: np.ndarray,
    actions: list[str | int] | None = None,
    frames: int | None = None,
    sampling: dict[str, Any] | None = None,
    seed: int = 0,
    context_actions: list[str | int] | None = None,
    max_frames: int | None = None,
) -> ResolvedRequest:
    """Everything `prepare` checks and fills in; context: uint8 (K, R, R, 3)."""
    notes: list[str] = []
    s = sampling_from(config, sampling or {})
    limit = min(max_frames or config.max_rollout_frames, config.max_rollout_frames)
    action_ids = [action_index(config, a) for a in actions or []]
    frames = _resolve_frames(frames, action_ids, limit, notes)
    if not action_ids:
        action_ids = [default_action(config)] * frames
        if not unconditional(config):  # an unconditional model takes none: nothing to note
            notes.append("actions: none given, using noop for every frame")
    elif len(action_ids) < frames:
        cycled = [action_ids[i % len(action_ids)] for i in range(frames)]
        notes.append(f"actions: {len(action_ids)} given for {frames} frames, repeated cyclically")
        action_ids = cycled
    elif len(action_ids) > frames:
        notes.append(f"actions: {len(action_ids)} given for {frames} frames, only the first "
                     f"{frames} used")  # fmt: skip
        action_ids = action_ids[:frames]
    ctx = _check_context(config, context)
    ctx_ids = [action_index(config, a, "context_actions") for a in context_actions or []]
    if ctx_ids and len(ctx_ids) != len(ctx):
        raise FieldError("context_actions",
                         f"{len(ctx_ids)} given for {len(ctx)} context frames")
    keep = max_context_frames(config, s.chunk_size)
    if len(ctx) > keep:
        notes.append(f"context: {len(ctx)} frames given, the first {len(ctx) - keep} trimmed "
                     f"(the model sees at most {keep} with chunk_size {s.chunk_size})")  # fmt: skip
        ctx, ctx_ids = ctx[-keep:], ctx_ids[-keep:] if ctx_ids else []
    check_context_frames(len(ctx), frame_stack(config))
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise FieldError("seed", f"{seed!r} must be an integer in [0, 2^63)")
    return ResolvedRequest(ctx, tuple(action_ids), tuple(ctx_ids) if ctx_ids else None, s,
                           seed, tuple(notes))


def rollout_request(config: BundleConfig, context: np.ndarray, actions: tuple[int, ...],
                    sampling: SamplingConfig, seed: int,
                    context_actions: tuple[int, ...] | None) -> RolloutRequest:
    """The engine's request: uint8 (K, R, R, 3) context pixels -> (K, C, R, R) in [-1, 1]."""
    tensor = torch.from_numpy(context).permute(0, 3, 1, 2).float() / config.data.pixel_scale
    tensor = tensor + config.data.pixel_shift  # (K, C, R, R) in [-1, 1]
    return RolloutRequest(context=tensor, actions=actions, sampling=sampling, seed=seed,
                          context_actions=context_actions)


def default_action(config: BundleConfig) -> int:
    """noop where the model names one, else the null (unconditional) action."""
    names = config.data.action_names
    return names.index("noop") if "noop" in names else config.network.n_actions


def _resolve_frames(frames: int | None, action_ids: list[int], limit: int,
                    notes: list[str]) -> int:
    if frames is None:
        frames = len(action_ids) or 16
    if not isinstance(frames, int) or isinstance(frames, bool):
        raise FieldError("frames", f"{frames!r} must be an integer")
    if not 1 <= frames <= limit:
        raise FieldError("frames", f"{frames} must be between 1 and {limit}")
    return frames


def _check_context(config: BundleConfig, context: np.ndarray) -> np.ndarray:
    r = config.network.resolution
    if context.ndim != 4 or context.shape[1:] != (r, r, 3) or context.dtype != np.uint8:
        raise FieldError("context", f"frames must be uint8 ({r}, {r}, 3), got {context.shape}")
    if len(context) == 0:
        raise FieldError("context", "at least one frame is needed")
    return context


def _coerce(key: str, value: Any, kind: type) -> Any:
    """Accept 8 for 8.0 and '8' for nothing: JSON numbers yes, strings for numbers no."""
    if kind is str:
        if not isinstance(value, str):
            raise FieldError(key, f"{value!r} must be a string")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError(key, f"{value!r} must be a number")
    if kind is int:
        if float(value) != int(value):
            raise FieldError(key, f"{value!r} must be an integer")
        return int(value)
    return float(value)
