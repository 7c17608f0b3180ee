"""Per-frame samplers as pure functions over the denoiser contract (k-diffusion style).

Shapes: x is (F, ...) — F frames of one rollout's chunk, any trailing dims; levels are (F,)
integers in [-1, T-1]. Each frame has its own alpha_bar, sigma and lambda, so one call moves
frames at different noise levels (the point of diffusion forcing). Every parameterisation is
converted to an x0 estimate before it reaches a sampler. A frame whose level does not change
is returned bit-identical (torch.where keeps the original values, not a recomputed copy).

Samplers:
- ddim (Song et al. 2021, eq. 12) with eta; ddpm is ddim with eta = 1 (the DDPM posterior).
- dpmpp_2m: DPM-Solver++(2M) in x0 form (Lu et al. 2022, Alg. 2), with a per-frame history
  (last x0 and step size h). The history is used only if that frame moved in the previous row
  and that step started from a finite lambda; otherwise the step is first order (= DDIM eta 0).
  The last step to a clean frame returns x0 itself, as k-diffusion does when sigma_next = 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from dfserve.model.config import SAMPLERS, SamplerName
from dfserve.model.diffusion import NoiseSchedule
from dfserve.model.errors import FieldError

Denoiser = Callable[[Tensor, Tensor, Any], Tensor]  # denoise(x, levels, cond) -> x0


@dataclass
class SamplerState:
    """What dpmpp_2m carries from one row to the next, per frame."""

    prev_x0: Tensor | None = None  # (F, ...) x0 estimate of the previous row
    prev_h: Tensor | None = None  # (F,) float64 step size h of the previous row
    valid: Tensor | None = None  # (F,) bool: history usable for a second-order step


def draw_noise(shape: torch.Size, generator: torch.Generator, clip: float, like: Tensor) -> Tensor:
    """Standard normal noise from the rollout's own generator, clamped like the DF reference."""
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return noise.to(device=like.device, dtype=like.dtype).clamp_(-clip, clip)


def _per_frame(values: Tensor, like: Tensor) -> Tensor:
    """(F,) float64 -> (F, 1, ..., 1) in like's dtype, to broadcast over a frame."""
    return values.to(like.dtype).view(values.shape + (1,) * (like.dim() - 1))


def ddim_step(
    ns: NoiseSchedule,
    x: Tensor,
    x0: Tensor,
    from_levels: Tensor,
    to_levels: Tensor,
    eta: float,
    generator: torch.Generator | None,
) -> Tensor:
    ab_a, ab_b = ns.alpha_bar(from_levels), ns.alpha_bar(to_levels)  # (F,) float64
    moving = from_levels != to_levels
    one_minus_a = (1 - ab_a).clamp_min(1e-20)  # moving frames are never clean at the start
    eps = (x - _per_frame(ab_a.sqrt(), x) * x0) / _per_frame(one_minus_a.sqrt(), x)
    sigma = eta * ((1 - ab_b) / one_minus_a * (1 - ab_a / ab_b)).clamp_min(0).sqrt()
    c_eps = (1 - ab_b - sigma**2).clamp_min(0).sqrt()
    out = _per_frame(ab_b.sqrt(), x) * x0 + _per_frame(c_eps, x) * eps
    if eta > 0:
        if generator is None:
            raise ValueError("a stochastic sampler needs a generator")
        noise = draw_noise(x.shape, generator, ns.cfg.clip_noise, x)
        out = out + _per_frame(sigma, x) * noise
    return torch.where(_per_frame(moving, x).bool(), out, x)


def dpmpp_2m_step(
    ns: NoiseSchedule,
    x: Tensor,
    x0: Tensor,
    from_levels: Tensor,
    to_levels: Tensor,
    state: SamplerState,
) -> tuple[Tensor, SamplerState]:
    ab_a, ab_b = ns.alpha_bar(from_levels), ns.alpha_bar(to_levels)
    lam_a, lam_b = ns.lambda_(from_levels), ns.lambda_(to_levels)
    moving = from_levels != to_levels
    to_clean = to_levels < 0
    h = lam_b - lam_a  # +inf when the step ends clean or starts at zero SNR
    # D = (1 + 1/2r) x0 - 1/2r x0_prev with r = h_prev / h, only where the history is valid
    use_history = moving & ~to_clean
    if state.valid is not None and state.prev_x0 is not None and state.prev_h is not None:
        use_history = use_history & state.valid
    else:
        use_history = torch.zeros_like(moving)
    denoised = x0
    if bool(use_history.any()):
        assert state.prev_h is not None and state.prev_x0 is not None
        half_inv_r = torch.where(use_history, h / (2 * state.prev_h), torch.zeros_like(h))
        second = (1 + _per_frame(half_inv_r, x)) * x0 - _per_frame(half_inv_r, x) * state.prev_x0
        denoised = torch.where(_per_frame(use_history, x).bool(), second, x0)
    sigma_ratio = ((1 - ab_b) / (1 - ab_a).clamp_min(1e-20)).sqrt()
    one_minus_exp = -torch.expm1(-h)  # 1 - e^{-h}; 1 when h = inf
    out = _per_frame(sigma_ratio, x) * x + _per_frame(ab_b.sqrt() * one_minus_exp, x) * denoised
    out = torch.where(_per_frame(to_clean, x).bool(), x0, out)  # final step: x0 itself
    out = torch.where(_per_frame(moving, x).bool(), out, x)
    new_state = SamplerState(
        prev_x0=x0,
        prev_h=torch.where(moving, h, torch.zeros_like(h)),
        valid=moving & torch.isfinite(lam_a) & torch.isfinite(h),
    )
    return out, new_state


class SamplerStep(Protocol):
    """One row of one sampler: x at from_levels -> x at to_levels, and its state for the next
    row. Every sampler takes every setting; one that has no use for a setting ignores it."""

    def __call__(self, ns: NoiseSchedule, x: Tensor, x0: Tensor, from_levels: Tensor,
                 to_levels: Tensor, state: SamplerState, eta: float,
                 generator: torch.Generator | None) -> tuple[Tensor, SamplerState]: ...


def _ddim(ns: NoiseSchedule, x: Tensor, x0: Tensor, from_levels: Tensor, to_levels: Tensor,
          state: SamplerState, eta: float, generator: torch.Generator | None
          ) -> tuple[Tensor, SamplerState]:
    return ddim_step(ns, x, x0, from_levels, to_levels, eta, generator), state


def _ddpm(ns: NoiseSchedule, x: Tensor, x0: Tensor, from_levels: Tensor, to_levels: Tensor,
          state: SamplerState, eta: float, generator: torch.Generator | None
          ) -> tuple[Tensor, SamplerState]:
    return ddim_step(ns, x, x0, from_levels, to_levels, 1.0, generator), state  # the posterior


def _dpmpp_2m(ns: NoiseSchedule, x: Tensor, x0: Tensor, from_levels: Tensor,
              to_levels: Tensor, state: SamplerState, eta: float,
              generator: torch.Generator | None) -> tuple[Tensor, SamplerState]:
    return dpmpp_2m_step(ns, x, x0, from_levels, to_levels, state)  # deterministic: no eta


# The samplers by name: SamplingConfig.sampler picks one. A new sampler is a function above,
# a line here and its name in model.config.SamplerName.
SAMPLER_STEPS: dict[SamplerName, SamplerStep] = {
    "ddim": _ddim,
    "ddpm": _ddpm,
    "dpmpp_2m": _dpmpp_2m,
}


def sampler_step(
    sampler: str,
    ns: NoiseSchedule,
    x: Tensor,
    x0: Tensor,
    from_levels: Tensor,
    to_levels: Tensor,
    state: SamplerState,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, SamplerState]:
    """One row for one rollout's frames: x at from_levels -> x at to_levels."""
    # any str may come, so the lookup's key type is ignored, and its value type kept
    step: SamplerStep | None = SAMPLER_STEPS.get(sampler)  # type: ignore[call-overload]
    if step is None:
        raise FieldError("sampler", f"{sampler!r} is not an accepted value", list(SAMPLERS))
    return step(ns, x, x0, from_levels, to_levels, state, eta, generator)


def sample_matrix(
    denoise: Denoiser,
    ns: NoiseSchedule,
    x: Tensor,
    matrix: np.ndarray,
    sampler: str,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    cond: Any = None,
) -> Tensor:
    """Run a whole scheduling matrix over frames x (F, ...) that start as noise at row 0.

    The reference loop of diffusion forcing for one chunk with no history; the rollout engine
    runs the same steps row by row with a KV cache and many rollouts per forward pass.
    """
    levels_of = ns.sampling_levels(int(matrix.max()))
    state = SamplerState()
    for m in range(matrix.shape[0] - 1):
        from_levels = levels_of[torch.from_numpy(matrix[m])].to(x.device)
        to_levels = levels_of[torch.from_numpy(matrix[m + 1])].to(x.device)
        x0 = denoise(x, from_levels, cond)
        x, state = sampler_step(sampler, ns, x, x0, from_levels, to_levels, state, eta, generator)
    return x
