"""Samplers against exact oracles: closed-form denoisers, closed-form flows and output laws.

Data: per-scalar x0 ~ N(mu_f, s_f^2) or a two-component Gaussian mixture, with parameters per
frame f. Both have an exact posterior-mean denoiser E[x0 | x_t], so every error measured here
is the sampler's own. The schedule has zero terminal SNR, so the starting noise N(0, 1) is
exactly the marginal at level T-1, and the probability-flow ODE has closed-form endpoints:
mu + s z for the Gaussian, the quantile map F^-1(Phi(z)) for the mixture (a 1-D monotone flow
pushing N(0, 1) onto the data law is the quantile map).

Shapes: F frames of one chunk, n independent scalars per frame; x is (F, n), levels (F,).
The `cond` passed through the denoiser contract is the (F,) tensor of frame ids, so a frame
keeps its own data law when it is sampled alone as a 1-frame chunk.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from dfserve.model import samplers, scheduling
from dfserve.model.config import SAMPLERS, DiffusionConfig
from dfserve.model.diffusion import NoiseSchedule
from dfserve.model.errors import FieldError

F64 = torch.float64
T = 1000
NS = NoiseSchedule(
    DiffusionConfig(timesteps=T, beta_schedule="cosine", objective="x0", zero_terminal_snr=True)
)
FRAMES = torch.arange(3)


pytestmark = pytest.mark.usefixtures("one_thread")  # bit-exact comparisons: tests/conftest.py


# --- oracles ----------------------------------------------------------------------------------

MU = torch.tensor([0.5, -1.0, 2.0], dtype=F64)  # (F,)
SD = torch.tensor([0.5, 1.5, 0.2], dtype=F64)  # (F,)


def gaussian_denoiser(x: Tensor, levels: Tensor, frames: Tensor) -> Tensor:
    """E[x0 | x_t] = mu + sqrt(ab) s^2 / (ab s^2 + 1 - ab) (x_t - sqrt(ab) mu), per frame."""
    ab = NS.alpha_bar(levels)[:, None]  # (F, 1)
    mu, s2 = MU[frames][:, None], SD[frames][:, None] ** 2
    return mu + ab.sqrt() * s2 / (ab * s2 + 1 - ab) * (x - ab.sqrt() * mu)


def gaussian_flow_endpoint(z: Tensor, frames: Tensor) -> Tensor:
    """Exact probability-flow ODE endpoint from N(0, 1) at zero SNR: mu + s z."""
    return MU[frames][:, None] + SD[frames][:, None] * z


MIX_W = torch.tensor([[0.3, 0.7], [0.6, 0.4], [0.4, 0.6]], dtype=F64)  # (F, K)
MIX_M = torch.tensor([[-1.0, 1.0], [-0.5, 1.5], [-1.5, 1.0]], dtype=F64)  # (F, K)
MIX_S = torch.tensor([[0.5, 0.6], [0.5, 0.5], [0.6, 0.5]], dtype=F64)  # (F, K)


def mixture_denoiser(x: Tensor, levels: Tensor, frames: Tensor) -> Tensor:
    """Exact posterior mean of a Gaussian mixture, one frame at a time (a frame's result is
    then bit-for-bit the same whatever else is in the chunk):
    sum_k r_k(x_t) (m_k + sqrt(ab) s_k^2 / v_k (x_t - sqrt(ab) m_k)), v_k = ab s_k^2 + 1 - ab,
    r_k proportional to w_k N(x_t; sqrt(ab) m_k, v_k)."""
    out = []
    for i, (f, level) in enumerate(zip(frames.tolist(), levels.tolist(), strict=True)):
        ab = NS.alpha_bar(torch.tensor(level))
        a = ab.sqrt()
        w, m, s2 = MIX_W[f][:, None], MIX_M[f][:, None], MIX_S[f][:, None] ** 2  # (K, 1)
        var = ab * s2 + 1 - ab  # (K, 1)
        xi = x[i][None, :]  # (1, n)
        logp = torch.log(w) - 0.5 * torch.log(var) - 0.5 * (xi - a * m) ** 2 / var  # (K, n)
        r = torch.softmax(logp, dim=0)
        out.append((r * (m + a * s2 / var * (xi - a * m))).sum(0))
    return torch.stack(out)  # (F, n)


def mixture_cdf(x: Tensor, f: int) -> Tensor:
    w, m, s = MIX_W[f][:, None], MIX_M[f][:, None], MIX_S[f][:, None]
    return (w * torch.special.ndtr((x[None, :] - m) / s)).sum(0)


def mixture_flow_endpoint(z: Tensor, frames: Tensor) -> Tensor:
    """F^-1(Phi(z)) per frame, by bisection to float64 resolution."""
    out = []
    for i, f in enumerate(frames.tolist()):
        target = torch.special.ndtr(z[i])
        lo, hi = torch.full_like(z[i], -30.0), torch.full_like(z[i], 30.0)
        for _ in range(80):
            mid = (lo + hi) / 2
            below = mixture_cdf(mid, f) < target
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        out.append((lo + hi) / 2)
    return torch.stack(out)


ORACLES = {
    "gaussian": (gaussian_denoiser, gaussian_flow_endpoint),
    "mixture": (mixture_denoiser, mixture_flow_endpoint),
}


def noise(n: int, seed: int) -> Tensor:
    return torch.randn(len(FRAMES), n, generator=torch.Generator().manual_seed(seed), dtype=F64)


def run(
    oracle: str,
    x: Tensor,
    matrix: np.ndarray,
    sampler: str,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    frames: Tensor = FRAMES,
) -> Tensor:
    """sample_matrix with the oracle's exact denoiser; `frames` are the chunk's frame ids."""
    denoise = ORACLES[oracle][0]
    return samplers.sample_matrix(denoise, NS, x, matrix, sampler, eta, generator, frames)


def rms(a: Tensor, b: Tensor) -> float:
    return float(((a - b) ** 2).mean().sqrt())


def fitted_order(steps: list[int], errors: list[float]) -> float:
    """Minus the least-squares slope of log error against log steps."""
    return float(-np.polyfit(np.log(steps), np.log(errors), 1)[0])


# --- convergence with order -------------------------------------------------------------------

N_PATHS = 2048
REF_STEPS = 1000  # = T: every level is a grid point
COARSE = [8, 16, 32, 64]
ORDER_BOUNDS = {"ddim": (0.8, 1.3), "dpmpp_2m": (1.6, 2.6)}


@pytest.fixture(scope="module")
def references() -> dict[str, tuple[Tensor, Tensor]]:
    """Initial noise and the dpmpp_2m solution with S = T steps from it, per oracle."""
    out = {}
    for oracle in ORACLES:
        z = noise(N_PATHS, seed=10)
        out[oracle] = (z, run(oracle, z, scheduling.full_sequence(REF_STEPS, 3), "dpmpp_2m"))
    return out


@pytest.mark.parametrize("oracle", list(ORACLES))
def test_reference_solution_is_the_exact_flow(references, oracle: str) -> None:
    """The fine reference reaches the closed-form ODE endpoint path by path, so its law is the
    data law; its moments agree with the truth within sampling error too."""
    z, ref = references[oracle]
    exact = ORACLES[oracle][1](z, FRAMES)
    assert float((ref - exact).abs().max()) < 2e-3, oracle
    assert rms(ref, exact) < 5e-4
    if oracle == "gaussian":
        mean, var = MU, SD**2
    else:
        mean = (MIX_W * MIX_M).sum(1)
        var = (MIX_W * (MIX_S**2 + MIX_M**2)).sum(1) - mean**2
    se = (var / N_PATHS).sqrt()
    assert bool(((ref.mean(1) - mean).abs() < 5 * se).all())
    assert bool(((ref.var(1) / var - 1).abs() < 5 * math.sqrt(2 / N_PATHS) + 0.01).all())
    if oracle == "mixture":  # component weights: share of samples above the midpoint
        mid = MIX_M.mean(1, keepdim=True)
        got = (ref > mid).double().mean(1)
        want = torch.stack([1 - mixture_cdf(mid[f], f)[0] for f in range(3)])
        assert bool(((got - want).abs() < 5 * (want * (1 - want) / N_PATHS).sqrt()).all())


@pytest.mark.parametrize("oracle", list(ORACLES))
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_deterministic_samplers_converge_with_their_order(
    references, oracle: str, sampler: str
) -> None:
    z, ref = references[oracle]
    errors = []
    for steps in COARSE:
        out = run(oracle, z, scheduling.full_sequence(steps, 3), sampler)
        # the same noise through other matrices gives the same samples, bit for bit
        for matrix in [scheduling.pyramid(steps, 3, 1.0), scheduling.autoregressive(steps, 3)]:
            assert torch.equal(run(oracle, z, matrix, sampler), out)
        errors.append(rms(out, ref))
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors
    order = fitted_order(COARSE, errors)
    lo, hi = ORDER_BOUNDS[sampler]
    assert lo <= order <= hi, (oracle, sampler, order, errors)


# --- schedules and chunking -------------------------------------------------------------------

MATRICES = {
    "full_sequence": scheduling.full_sequence(8, 3),
    "pyramid u=1": scheduling.pyramid(8, 3, 1.0),
    "pyramid u=0.5": scheduling.pyramid(8, 3, 0.5),
    "pyramid u=2.5": scheduling.pyramid(8, 3, 2.5),
    "autoregressive": scheduling.autoregressive(8, 3),
    "trapezoid": scheduling.trapezoid(8, 3, 1.0),
}


@pytest.mark.parametrize("oracle", list(ORACLES))
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_same_noise_same_samples_under_every_schedule(oracle: str, sampler: str) -> None:
    """Every frame visits the same levels in the same order under every matrix, so a
    deterministic sampler with a per-frame state gives identical frames."""
    z = noise(512, seed=11)
    outs = {name: run(oracle, z, m, sampler) for name, m in MATRICES.items()}
    first = outs["full_sequence"]
    assert not torch.equal(first, z)
    for name, out in outs.items():
        assert torch.equal(out, first), name


@pytest.mark.parametrize("oracle", list(ORACLES))
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("schedule", ["full_sequence", "pyramid", "autoregressive", "trapezoid"])
def test_frames_sampled_together_equal_frames_sampled_alone(
    oracle: str, sampler: str, schedule: str
) -> None:
    z = noise(512, seed=12)
    together = run(oracle, z, scheduling.scheduling_matrix(schedule, 8, 3, 1.0), sampler)
    for f in range(3):
        alone = run(
            oracle,
            z[f : f + 1].clone(),
            scheduling.scheduling_matrix(schedule, 8, 1, 1.0),
            sampler,
            frames=torch.tensor([f]),
        )
        assert torch.equal(alone[0], together[f]), (f, schedule)


# --- stochastic samplers ----------------------------------------------------------------------


def output_law(steps: int, eta: float) -> tuple[Tensor, Tensor]:
    """Exact mean and std of a sampler's output for the Gaussian data, per frame.

    With the exact denoiser every step is affine in x plus independent Gaussian noise, so the
    law stays Gaussian; propagate (mean, var) from N(0, 1). Written from the papers' formulas:
    eta = 1 uses the DDPM posterior q(x_s | x_t, x0) (Ho et al. 2020, eqs. 6-7), other eta the
    DDIM update (Song et al. 2021, eq. 12 with sigma_eta of eq. 16)."""
    grid = NS.sampling_levels(steps).tolist()
    means, stds = [], []
    for mu, s in zip(MU.tolist(), SD.tolist(), strict=True):
        s2, m, v = s * s, 0.0, 1.0
        for i in range(steps, 0, -1):
            at = float(NS.alpha_bar(torch.tensor(grid[i])))
            as_ = float(NS.alpha_bar(torch.tensor(grid[i - 1])))
            k = math.sqrt(at) * s2 / (at * s2 + 1 - at)  # D(x) = k x + (1 - k sqrt(at)) mu
            d_x, d_1 = k, (1 - k * math.sqrt(at)) * mu
            if eta == 1.0:
                beta = 1 - at / as_  # the DDPM posterior between the two grid levels
                c_x0 = math.sqrt(as_) * beta / (1 - at)
                c_xt = math.sqrt(at / as_) * (1 - as_) / (1 - at)
                var_step = (1 - as_) / (1 - at) * beta
            else:
                var_step = eta**2 * (1 - as_) / (1 - at) * (1 - at / as_)
                c_eps = math.sqrt(max(1 - as_ - var_step, 0.0))
                # sqrt(as) x0 + c_eps (x - sqrt(at) x0) / sqrt(1 - at)
                c_xt = c_eps / math.sqrt(1 - at)
                c_x0 = math.sqrt(as_) - c_xt * math.sqrt(at)
            c = c_xt + c_x0 * d_x
            m, v = c * m + c_x0 * d_1, c * c * v + var_step
        means.append(m)
        stds.append(math.sqrt(v))
    return torch.tensor(means, dtype=F64), torch.tensor(stds, dtype=F64)


STOCHASTIC = [("ddpm", 1.0), ("ddim", 0.5)]


@pytest.mark.parametrize(("sampler", "eta"), STOCHASTIC + [("ddim", 0.0)])
def test_sampler_output_law_is_exact_at_few_steps(sampler: str, eta: float) -> None:
    """At S = 20 the samplers are far from the data law (std 8-24 % low), and each eta has
    its own exact law; 100k samples per frame pin it within a few standard errors."""
    n = 100_000
    x = run(
        "gaussian",
        noise(n, seed=13),
        scheduling.full_sequence(20, 3),
        sampler,
        eta=eta,
        generator=torch.Generator().manual_seed(14),
    )
    mean, std = output_law(20, eta)
    se_mean, se_std = std / math.sqrt(n), std / math.sqrt(2 * n)
    assert bool(((x.mean(1) - mean).abs() < 5 * se_mean).all()), (x.mean(1), mean)
    assert bool(((x.std(1) - std).abs() < 5 * se_std).all()), (x.std(1), std)


def test_output_law_tends_to_the_data_law() -> None:
    for eta in [1.0, 0.5, 0.0]:
        gaps = [float((output_law(s, eta)[1] / SD - 1).abs().max()) for s in [20, 100, 1000]]
        assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.01, (eta, gaps)
        assert float((output_law(1000, eta)[0] - MU).abs().max()) < 1e-9


@pytest.mark.parametrize(("sampler", "eta"), STOCHASTIC)
def test_stochastic_samplers_converge_in_distribution_gaussian(sampler: str, eta: float) -> None:
    n, steps = 100_000, 250
    x = run(
        "gaussian",
        noise(n, seed=15),
        scheduling.pyramid(steps, 3, 1.0),
        sampler,
        eta=eta,
        generator=torch.Generator().manual_seed(16),
    )
    # a few standard errors, plus the discretization allowance of S = 250 (std <= 3.4 % low)
    se_mean, se_std = SD / math.sqrt(n), SD / math.sqrt(2 * n)
    assert bool(((x.mean(1) - MU).abs() < 5 * se_mean).all()), x.mean(1)
    assert bool(((x.std(1) - SD).abs() < 5 * se_std + 0.04 * SD).all()), x.std(1)


@pytest.mark.parametrize(("sampler", "eta"), STOCHASTIC)
def test_stochastic_samplers_converge_in_distribution_mixture(sampler: str, eta: float) -> None:
    n, steps = 40_000, 150
    x = run(
        "mixture",
        noise(n, seed=17),
        scheduling.full_sequence(steps, 3),
        sampler,
        eta=eta,
        generator=torch.Generator().manual_seed(18),
    )
    mid = MIX_M.mean(1, keepdim=True)
    share = (x > mid).double().mean(1)  # weight of the upper component, as classified
    want = torch.stack([1 - mixture_cdf(mid[f], f)[0] for f in range(3)])
    se = (want * (1 - want) / n).sqrt()
    assert bool(((share - want).abs() < 5 * se + 0.01).all()), (share, want)
    mean = (MIX_W * MIX_M).sum(1)
    var = (MIX_W * (MIX_S**2 + MIX_M**2)).sum(1) - mean**2
    assert bool(((x.mean(1) - mean).abs() < 5 * (var / n).sqrt() + 0.01).all())
    assert bool(((x.var(1) / var - 1).abs() < 0.06).all()), x.var(1) / var


# --- single steps -----------------------------------------------------------------------------


def _levels(*steps_index: int, steps: int = 8) -> Tensor:
    return NS.sampling_levels(steps)[list(steps_index)]


@pytest.mark.parametrize(
    ("sampler", "eta"), [("ddim", 0.0), ("ddim", 0.5), ("ddpm", 0.0), ("dpmpp_2m", 0.0)]
)
def test_frames_whose_level_does_not_change_stay_bit_identical(sampler: str, eta: float) -> None:
    gen = torch.Generator().manual_seed(20)
    x = torch.randn(5, 64, generator=gen, dtype=F64)
    x0 = torch.randn(5, 64, generator=gen, dtype=F64)  # deliberately not x's posterior mean
    # frames 0, 2, 4 stay (clean, middle, pure noise); 1 and 3 move (to clean, to a middle level)
    from_levels = _levels(0, 1, 4, 5, 8)
    to_levels = _levels(0, 0, 4, 3, 8)
    frozen = torch.tensor([True, False, True, False, True])
    # a dpmpp_2m state whose history is valid for every frame, so only "moving" protects them
    state = samplers.SamplerState(
        prev_x0=torch.randn(5, 64, generator=gen, dtype=F64),
        prev_h=torch.full((5,), 0.3, dtype=F64),
        valid=torch.ones(5, dtype=torch.bool),
    )
    for st in [samplers.SamplerState(), state]:
        out, _ = samplers.sampler_step(
            sampler, NS, x, x0, from_levels, to_levels, st, eta, torch.Generator().manual_seed(21)
        )
        assert torch.equal(out[frozen], x[frozen])
        for f in [1, 3]:
            assert not torch.equal(out[f], x[f])
        assert torch.equal(out[1], x0[1])  # the step to clean returns x0 itself


def test_ddim_step_matches_song_et_al_eq_12() -> None:
    gen = torch.Generator().manual_seed(22)
    x = torch.randn(3, 32, generator=gen, dtype=F64)
    x0 = torch.randn(3, 32, generator=gen, dtype=F64)
    from_levels, to_levels = _levels(8, 5, 2), _levels(6, 4, 0)
    out = samplers.ddim_step(NS, x, x0, from_levels, to_levels, 0.0, None)
    for f in range(3):
        at = float(NS.alpha_bar(from_levels[f]))
        as_ = float(NS.alpha_bar(to_levels[f]))
        eps = (x[f] - math.sqrt(at) * x0[f]) / math.sqrt(1 - at)
        want = math.sqrt(as_) * x0[f] + math.sqrt(1 - as_) * eps
        torch.testing.assert_close(out[f], want, rtol=1e-12, atol=1e-12)


def test_ddpm_step_is_the_ddpm_posterior_with_the_generators_clamped_noise() -> None:
    gen = torch.Generator().manual_seed(23)
    x = torch.randn(3, 32, generator=gen, dtype=F64)
    x0 = torch.randn(3, 32, generator=gen, dtype=F64)
    from_levels, to_levels = _levels(8, 5, 2), _levels(7, 4, 1)
    out, _ = samplers.sampler_step(
        "ddpm",
        NS,
        x,
        x0,
        from_levels,
        to_levels,
        samplers.SamplerState(),
        0.0,  # ignored: ddpm is eta 1
        torch.Generator().manual_seed(24),
    )
    # the sampler's noise: float32 standard normal from the rollout's generator, clamped
    eps = torch.randn(3, 32, generator=torch.Generator().manual_seed(24), dtype=torch.float32)
    eps = eps.to(F64).clamp(-NS.cfg.clip_noise, NS.cfg.clip_noise)
    for f in range(3):
        at = float(NS.alpha_bar(from_levels[f]))
        as_ = float(NS.alpha_bar(to_levels[f]))
        beta = 1 - at / as_
        mean = (
            math.sqrt(as_) * beta / (1 - at) * x0[f]
            + math.sqrt(at / as_) * (1 - as_) / (1 - at) * x[f]
        )
        var = (1 - as_) / (1 - at) * beta
        torch.testing.assert_close(out[f], mean + math.sqrt(var) * eps[f], rtol=1e-10, atol=1e-12)


def test_stochastic_sampler_without_generator_and_unknown_sampler_raise() -> None:
    x = torch.zeros(1, 4, dtype=F64)
    lv_a, lv_b = _levels(4), _levels(3)
    with pytest.raises(ValueError, match="generator"):
        samplers.sampler_step("ddpm", NS, x, x, lv_a, lv_b, samplers.SamplerState())
    with pytest.raises(FieldError, match=r"^sampler: 'euler'") as e:
        samplers.sampler_step("euler", NS, x, x, lv_a, lv_b, samplers.SamplerState())
    assert (e.value.field, e.value.accepted) == ("sampler", list(SAMPLERS))


def test_every_sampler_name_has_its_function() -> None:
    assert list(samplers.SAMPLER_STEPS) == list(SAMPLERS)


# --- dpmpp_2m history -------------------------------------------------------------------------


def _dpmpp_by_hand(
    x: Tensor, x0: Tensor, x0_prev: Tensor | None, la: int, lb: int, h_prev: float | None
) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 Alg. 2, in scalars: h = lambda_b - lambda_a,
    D = (1 + 1/2r) x0 - 1/2r x0_prev with r = h_prev / h (first order: D = x0),
    x_b = sigma_b / sigma_a x_a + alpha_b (1 - e^-h) D."""
    ab_a = float(NS.alpha_bar(torch.tensor(la)))
    ab_b = float(NS.alpha_bar(torch.tensor(lb)))
    lam_a = 0.5 * math.log(ab_a / (1 - ab_a))
    lam_b = 0.5 * math.log(ab_b / (1 - ab_b))
    h = lam_b - lam_a
    d = x0
    if x0_prev is not None and h_prev is not None:
        r = h_prev / h
        d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
    return math.sqrt((1 - ab_b) / (1 - ab_a)) * x + math.sqrt(ab_b) * (1 - math.exp(-h)) * d


def test_dpmpp_2m_history_rule() -> None:
    gen = torch.Generator().manual_seed(30)
    lv = NS.sampling_levels(8).tolist()
    x = torch.randn(4, 32, generator=gen, dtype=F64)
    # row 1: frame 0 moves from a finite lambda, frame 1 stays, frame 2 moves from zero SNR
    # (lambda = -inf), frame 3 moves from a finite lambda
    a1 = torch.tensor([lv[6], lv[6], lv[8], lv[3]])
    b1 = torch.tensor([lv[5], lv[6], lv[7], lv[2]])
    x0_1 = torch.randn(4, 32, generator=gen, dtype=F64)
    x1, state = samplers.sampler_step("dpmpp_2m", NS, x, x0_1, a1, b1, samplers.SamplerState())
    assert state.valid is not None and state.valid.tolist() == [True, False, False, True]
    # row 2: every frame moves; frame 3 goes to clean
    a2, b2 = b1, torch.tensor([lv[4], lv[5], lv[6], lv[0]])
    x0_2 = torch.randn(4, 32, generator=gen, dtype=F64)
    x2, _ = samplers.sampler_step("dpmpp_2m", NS, x1, x0_2, a2, b2, state)
    lam = NS.lambda_
    h_prev0 = float(lam(b1[0]) - lam(a1[0]))
    # frame 0: second order with r = h_prev / h
    want0 = _dpmpp_by_hand(x1[0], x0_2[0], x0_1[0], lv[5], lv[4], h_prev0)
    torch.testing.assert_close(x2[0], want0, rtol=1e-10, atol=1e-12)
    first0 = _dpmpp_by_hand(x1[0], x0_2[0], None, lv[5], lv[4], None)
    assert float((x2[0] - first0).abs().max()) > 1e-3  # the history really changed the step
    # frames 1 (did not move) and 2 (moved from lambda = -inf): first order, = DDIM eta 0
    ddim = samplers.ddim_step(NS, x1, x0_2, a2, b2, 0.0, None)
    fresh, _ = samplers.sampler_step("dpmpp_2m", NS, x1, x0_2, a2, b2, samplers.SamplerState())
    for f in [1, 2]:
        assert torch.equal(x2[f], fresh[f])
        torch.testing.assert_close(x2[f], ddim[f], rtol=1e-12, atol=1e-12)
        want = _dpmpp_by_hand(x1[f], x0_2[f], None, int(a2[f]), int(b2[f]), None)
        torch.testing.assert_close(x2[f], want, rtol=1e-10, atol=1e-12)
    # frame 3: the final step to clean returns x0 exactly, history or not
    assert torch.equal(x2[3], x0_2[3])


def test_dpmpp_2m_history_needs_the_previous_row_not_an_older_one() -> None:
    """A frame that moved, then paused for a row, restarts at first order."""
    gen = torch.Generator().manual_seed(31)
    lv = NS.sampling_levels(8).tolist()
    x = torch.randn(1, 16, generator=gen, dtype=F64)
    state = samplers.SamplerState()
    path = [(lv[6], lv[5]), (lv[5], lv[5]), (lv[5], lv[4])]
    for la, lb in path:
        x0 = torch.randn(1, 16, generator=gen, dtype=F64)
        before = x
        x, state = samplers.sampler_step(
            "dpmpp_2m", NS, x, x0, torch.tensor([la]), torch.tensor([lb]), state
        )
    want = _dpmpp_by_hand(before[0], x0[0], None, lv[5], lv[4], None)
    torch.testing.assert_close(x[0], want, rtol=1e-10, atol=1e-12)
