"""Noise-schedule tables, parameterisation conversions and q_sample.

Levels are integers in [-1, T-1]; level -1 is a clean frame (alpha_bar = 1). Tables are kept
in float64 and indexed with `level + 1`, so one gather serves clean and noisy frames alike.
Beta schedules follow the diffusion-forcing reference (linear: DDPM; cosine: Nichol & Dhariwal
2021; sigmoid: Jabri et al. 2022, start -3, end 3, tau 1), betas clipped at 0.999.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dfserve.model.config import BETA_SCHEDULES, OBJECTIVES, DiffusionConfig


def linear_betas(timesteps: int) -> Tensor:
    scale = 1000 / timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)


def cosine_betas(timesteps: int, s: float = 0.008) -> Tensor:
    t = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64) / timesteps
    alphas_cumprod = torch.cos((t + s) / (1 + s) * math.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(0, 0.999)


def sigmoid_betas(timesteps: int, start: float = -3, end: float = 3, tau: float = 1) -> Tensor:
    t = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64) / timesteps
    v_start = torch.tensor(start / tau, dtype=torch.float64).sigmoid()
    v_end = torch.tensor(end / tau, dtype=torch.float64).sigmoid()
    alphas_cumprod = (-((t * (end - start) + start) / tau).sigmoid() + v_end) / (v_end - v_start)
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(0, 0.999)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2023, Alg. 1: shift/scale sqrt(alpha_bar) so the last level has SNR 0."""
    sqrt_ab = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alphas_cumprod = sqrt_ab**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1 - alphas


def make_betas(cfg: DiffusionConfig) -> Tensor:
    builders = {"linear": linear_betas, "cosine": cosine_betas, "sigmoid": sigmoid_betas}
    if cfg.beta_schedule not in builders:
        raise ValueError(f"beta_schedule: {cfg.beta_schedule!r} is not one of {BETA_SCHEDULES}")
    betas = builders[cfg.beta_schedule](cfg.timesteps)
    return rescale_zero_terminal_snr(betas) if cfg.zero_terminal_snr else betas


class NoiseSchedule:
    """alpha_bar, sigma and lambda per level, and the conversions between parameterisations."""

    def __init__(self, cfg: DiffusionConfig):
        if cfg.objective not in OBJECTIVES:
            raise ValueError(f"objective: {cfg.objective!r} is not one of {OBJECTIVES}")
        self.cfg = cfg
        self.timesteps = cfg.timesteps
        alphas_cumprod = torch.cumprod(1 - make_betas(cfg), 0)
        # index 0 is level -1 (clean): alpha_bar = 1
        self.alpha_bar_table = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod])

    def alpha_bar(self, levels: Tensor) -> Tensor:
        """float64 alpha_bar for integer levels of any shape (-1 = clean)."""
        table = self.alpha_bar_table.to(levels.device)
        return table[(levels + 1).long()]

    def lambda_(self, levels: Tensor) -> Tensor:
        """Half log-SNR lambda = log(alpha / sigma); +inf when clean, -inf at zero SNR."""
        ab = self.alpha_bar(levels)
        return 0.5 * (torch.log(ab) - torch.log1p(-ab))

    def sampling_levels(self, steps: int) -> Tensor:
        """Step index m in [0, S] -> level, linspace(-1, T-1, S+1) truncated (DF reference)."""
        return torch.linspace(-1, self.timesteps - 1, steps + 1).long()

    def q_sample(self, x0: Tensor, levels: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(ab) x0 + sqrt(1-ab) eps, with levels shaped like x0's leading dims."""
        a, s = self._coefs(levels, x0)
        return a * x0 + s * noise

    def to_x0(self, out: Tensor, x: Tensor, levels: Tensor) -> Tensor:
        """Convert the network output (objective parameterisation) to an x0 estimate."""
        a, s = self._coefs(levels, x)
        if self.cfg.objective == "x0":
            return out
        if self.cfg.objective == "v":  # v = a eps - s x0  =>  x0 = a x - s v
            return a * x - s * out
        # eps: x0 = (x - s eps) / a, exactly, with the predicted eps clamped to
        # [-clip_noise, clip_noise] as the DF reference does (model_predictions, pred_noise):
        # beta <= 0.999 keeps a > 0 (4.9e-5 at cosine level 999), so no floor on a is needed,
        # and a floor there would shrink x0 (1e-4 gave 0.49 x0 at that level). Only
        # zero_terminal_snr makes a = 0 (Lin et al. pair it with v): x0 is then undetermined
        # and its estimate is 0, the data's centre, instead of inf.
        clip = self.cfg.clip_noise
        x0 = (x - s * out.clamp(-clip, clip)) / torch.where(a > 0, a, 1)
        return torch.where(a > 0, x0, 0)

    def target(self, x0: Tensor, noise: Tensor, levels: Tensor) -> Tensor:
        """The training target of the configured objective."""
        a, s = self._coefs(levels, x0)
        if self.cfg.objective == "x0":
            return x0
        if self.cfg.objective == "v":
            return a * noise - s * x0
        return noise

    def eps_from_x0(self, x: Tensor, x0: Tensor, levels: Tensor) -> Tensor:
        a, s = self._coefs(levels, x)
        return (x - a * x0) / s.clamp_min(1e-12)

    def v_from_x0(self, x: Tensor, x0: Tensor, levels: Tensor) -> Tensor:
        a, s = self._coefs(levels, x)
        eps = self.eps_from_x0(x, x0, levels)
        return a * eps - s * x0

    def _coefs(self, levels: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """sqrt(ab) and sqrt(1-ab) shaped to broadcast over `like` (levels = leading dims)."""
        ab = self.alpha_bar(levels).to(like.dtype)
        shape = ab.shape + (1,) * (like.dim() - ab.dim())
        return ab.sqrt().view(shape), (1 - ab).clamp_min(0).sqrt().view(shape)
