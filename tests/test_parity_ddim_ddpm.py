"""Parity of sample_ddim / sample_ddpm with diffusers' DDIMScheduler / DDPMScheduler driven by the same fake network.

diffusers keeps x in the VP view starting from init_noise_sigma = 1: our start is x_vp * sqrt(1 + sigmas[0]^2)
and its result is compared after ve_from_vp(x, sigmas[-1]). Both draw the same noise (NoiseQueue).
Our DiscreteSchedule is built from the same ScheduleConfig in float64; diffusers' float32 tables and
coefficients differ by ~1e-6 relative at most, well inside the 1e-5 tolerance.

Spacings: 'leading' (SD, steps_offset=1) and 'trailing'. diffusers' DDIM steps from t to t - T // steps, which
is the next timestep only when those spacings are uniform (T % steps == 0 for trailing); its 'linspace'
trajectory cannot be written as one sigma sequence, so it is not tested. DDPM steps to the next timestep of
its list, so DDPM is also tested with 'linspace' (rounded timesteps, built here from schedule pieces since
sample_sigmas has no round_linspace argument).
"""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ldm.denoiser import Denoiser
from ldm.samplers import STOCHASTIC, get_sampler
from ldm.samplers.ddim import sample_ddim, sample_ddpm
from ldm.schedule import TERMINAL_ALPHA_CUMPROD, DiscreteSchedule, ScheduleConfig, append_final
from tests.fakes import SD_SCHEDULE, NoiseQueue, drive_diffusers, fake_net, patch_randn, rel_err, ve_from_vp

SHAPE = (2, 4, 8, 8)
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}
# (timestep_spacing, steps_offset, set_alpha_to_one): SD settings, trailing, and SD ending at sigma = 0
DDIM_SETTINGS = [("leading", 1, False), ("trailing", 0, False), ("leading", 1, True)]


def x_vp_init() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def run_ours(sampler, schedule, prediction, sigmas, **options):
    den = Denoiser(fake_net, schedule, prediction)
    x = x_vp_init() * math.sqrt(1 + float(sigmas[0]) ** 2)
    return sampler(den, x, sigmas, noise=NoiseQueue(SHAPE).as_noise_fn(), **options)


def run_diffusers(monkeypatch, sched, steps, **step_kwargs):
    patch_randn(monkeypatch, sched, NoiseQueue(SHAPE))
    ref, _ = drive_diffusers(sched, steps, x_vp_init(), step_kwargs=step_kwargs)
    return ref


# ------------------------------------------------------------------------------------------------ DDIM


@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing,offset,alpha_one", DDIM_SETTINGS)
def test_ddim_matches_diffusers(monkeypatch, steps, prediction_type, eta, spacing, offset, alpha_one):
    sched = DDIMScheduler(
        **SD_SCHEDULE, clip_sample=False, set_alpha_to_one=alpha_one, steps_offset=offset,
        timestep_spacing=spacing, prediction_type=prediction_type,
    )
    ref = run_diffusers(monkeypatch, sched, steps, eta=eta)
    ours = DiscreteSchedule(ScheduleConfig())
    sigmas = ours.sample_sigmas(steps, spacing, steps_offset=offset, final="zero" if alpha_one else "sigma_min")
    x = run_ours(sample_ddim, ours, PREDICTIONS[prediction_type], sigmas, eta=eta)
    assert rel_err(x, ve_from_vp(ref, float(sigmas[-1]))) < 1e-5


def zero_snr_pair(scheduler_cls, patch_terminal, **kwargs):
    """diffusers scheduler with rescale_betas_zero_snr (v-prediction, trailing: Lin et al. 2023) + our schedule.

    alphas_cumprod[-1] = 0 means sigma = inf; our DiscreteSchedule stores 2**-24 instead (sigma ~ 4096), as
    diffusers' sigma-based schedulers do. With ``patch_terminal`` diffusers' table gets the same value.
    """
    sched = scheduler_cls(
        **SD_SCHEDULE, clip_sample=False, timestep_spacing="trailing", prediction_type="v_prediction",
        rescale_betas_zero_snr=True, **kwargs,
    )
    assert sched.alphas_cumprod[-1] == 0
    if patch_terminal:
        sched.alphas_cumprod[-1] = TERMINAL_ALPHA_CUMPROD
    return sched, DiscreteSchedule(ScheduleConfig(zero_terminal_snr=True))


@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_zero_terminal_snr_matches_diffusers(monkeypatch, steps, eta):
    sched, ours = zero_snr_pair(DDIMScheduler, True, set_alpha_to_one=False)
    ref = run_diffusers(monkeypatch, sched, steps, eta=eta)
    sigmas = ours.sample_sigmas(steps, "trailing", final="sigma_min")
    x = run_ours(sample_ddim, ours, "v", sigmas, eta=eta)
    assert rel_err(x, ve_from_vp(ref, float(sigmas[-1]))) < 1e-5


@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_zero_terminal_snr_true_zero_is_close(monkeypatch, steps):
    # Unpatched diffusers uses alphas_cumprod = 0 exactly at the first step; our sigma_max = sigma(2**-24)
    # shifts that step's x0 by ~sqrt(2**-24) = 2**-12 relative, hence the looser tolerance.
    # (Unpatched diffusers DDIM with eta = 1 gives NaN there: 1 - a' - std^2 < 0 in float32.)
    sched, ours = zero_snr_pair(DDIMScheduler, False, set_alpha_to_one=False)
    ref = run_diffusers(monkeypatch, sched, steps, eta=0.0)
    sigmas = ours.sample_sigmas(steps, "trailing", final="sigma_min")
    x = run_ours(sample_ddim, ours, "v", sigmas, eta=0.0)
    assert rel_err(x, ve_from_vp(ref, float(sigmas[-1]))) < 2.0**-12


# ------------------------------------------------------------------------------------------------ DDPM


def ddpm_sigmas(ours: DiscreteSchedule, steps: int, spacing: str, offset: int) -> torch.Tensor:
    """diffusers' DDPM timesteps (linspace rounded) -> sigmas, ending at 0 (DDPM's last step goes to alpha = 1)."""
    t = ours.timesteps(steps, spacing, offset, round_linspace=True)
    return append_final(ours.t_to_sigma(t), "zero", ours.sigma_min)


@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("trailing", 0), ("linspace", 0)])
def test_ddpm_matches_diffusers(monkeypatch, steps, prediction_type, spacing, offset):
    sched = DDPMScheduler(
        **SD_SCHEDULE, clip_sample=False, steps_offset=offset, timestep_spacing=spacing,
        prediction_type=prediction_type,
    )
    ref = run_diffusers(monkeypatch, sched, steps)
    ours = DiscreteSchedule(ScheduleConfig())
    sigmas = ddpm_sigmas(ours, steps, spacing, offset)
    if spacing != "linspace":
        assert torch.equal(sigmas, ours.sample_sigmas(steps, spacing, steps_offset=offset))
    x = run_ours(sample_ddpm, ours, PREDICTIONS[prediction_type], sigmas)
    # diffusers' last step (t > 0) adds 1e-10 * noise (its variance is clamped at 1e-20): far below 1e-5
    assert rel_err(x, ve_from_vp(ref, 0.0)) < 1e-5


@pytest.mark.parametrize("steps", [10, 25, 50])
def test_ddpm_zero_terminal_snr_matches_diffusers(monkeypatch, steps):
    sched, ours = zero_snr_pair(DDPMScheduler, True)
    ref = run_diffusers(monkeypatch, sched, steps)
    sigmas = ours.sample_sigmas(steps, "trailing")
    x = run_ours(sample_ddpm, ours, "v", sigmas)
    assert rel_err(x, ve_from_vp(ref, 0.0)) < 1e-5


def test_ddpm_zero_terminal_snr_true_zero_is_close(monkeypatch):
    # see test_ddim_zero_terminal_snr_true_zero_is_close for the tolerance
    sched, ours = zero_snr_pair(DDPMScheduler, False)
    ref = run_diffusers(monkeypatch, sched, 25)
    x = run_ours(sample_ddpm, ours, "v", ours.sample_sigmas(25, "trailing"))
    assert rel_err(x, ve_from_vp(ref, 0.0)) < 2.0**-12


# ------------------------------------------------------------------------------------ contract and input


def test_registered_as_stochastic():
    assert get_sampler("ddim") is sample_ddim and get_sampler("ddpm") is sample_ddpm
    assert {"ddim", "ddpm"} <= STOCHASTIC


@pytest.mark.parametrize("sampler,options", [(sample_ddim, {"eta": 0.0}), (sample_ddim, {"eta": 0.5}), (sample_ddpm, {})])
def test_sigmas_ending_at_zero_land_on_x0_prediction(sampler, options):
    ours = DiscreteSchedule(ScheduleConfig())
    sigmas = ours.sample_sigmas(5, "leading", steps_offset=1)
    steps = []
    x = run_ours(sampler, ours, "eps", sigmas, callback=steps.append, **options)
    assert [s.i for s in steps] == list(range(5))  # one callback per step
    assert steps[-1].sigma_next == 0.0
    assert torch.equal(x, steps[-1].denoised)


def test_eta_zero_is_an_euler_step():
    # DDIM eta = 0 in the VE view is one Euler step of the probability-flow ODE (independent closed form)
    ours = DiscreteSchedule(ScheduleConfig())
    den = Denoiser(fake_net, ours, "eps")
    x = x_vp_init() * 10.0
    s0, s1 = 9.0, 4.0
    d = (x - den(x, s0)) / s0
    out = sample_ddim(den, x, torch.tensor([s0, s1], dtype=torch.float64))
    assert rel_err(out, x + (s1 - s0) * d) < 1e-12  # fp64 rounding only


@pytest.mark.parametrize("eta", [-0.1, float("nan"), float("inf"), "1", True])
def test_bad_eta_raises(eta):
    den = Denoiser(fake_net, DiscreteSchedule(ScheduleConfig()), "eps")
    with pytest.raises(ValueError, match="eta"):
        sample_ddim(den, torch.zeros(SHAPE, dtype=torch.float64), torch.tensor([1.0, 0.0]), eta=eta)


@pytest.mark.parametrize("sampler", [sample_ddim, sample_ddpm])
def test_zero_sigma_before_last_raises(sampler):
    den = Denoiser(fake_net, DiscreteSchedule(ScheduleConfig()), "eps")
    with pytest.raises(ValueError, match="sigmas"):
        sampler(den, torch.zeros(SHAPE, dtype=torch.float64), torch.tensor([1.0, 0.0, 0.0]))
