"""Schedules against diffusers' scheduler internals (an independent implementation)."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as ref_rescale

from ldm.schedule import (
    DiscreteSchedule, ScheduleConfig, check_sigmas, exponential_sigmas, karras_sigmas, make_betas,
    rescale_zero_terminal_snr,
)
from tests.fakes import SD_SCHEDULE

# diffusers builds betas in float32, we in float64: agreement is float32 rounding, ~1e-7 relative per entry
# (cumprod accumulates it over 1000 factors, hence 2e-6 for alphas_cumprod).
F32 = dict(rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("kind", ["scaled_linear", "linear", "squaredcos_cap_v2"])
def test_betas_match_diffusers(kind):
    kw = dict(beta_start=0.0001, beta_end=0.02) if kind == "linear" else dict(beta_start=0.00085, beta_end=0.012)
    ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule=kind, **kw)
    ours = make_betas(ScheduleConfig(beta_schedule=kind, **kw))
    torch.testing.assert_close(ours, ref.betas.double(), **F32)
    sched = DiscreteSchedule(ScheduleConfig(beta_schedule=kind, **kw))
    torch.testing.assert_close(sched.alphas_cumprod, ref.alphas_cumprod.double(), **F32)


def test_zero_terminal_snr_matches_diffusers_and_is_zero():
    betas = make_betas(ScheduleConfig())
    ours = rescale_zero_terminal_snr(betas)
    torch.testing.assert_close(ours, ref_rescale(betas.clone()), rtol=1e-12, atol=1e-15)
    ac = torch.cumprod(1 - ours, 0)
    assert ac[-1] == 0 and abs(float(ac[0]) - float(torch.cumprod(1 - betas, 0)[0])) < 1e-12
    sched = DiscreteSchedule(ScheduleConfig(zero_terminal_snr=True))
    assert sched.alphas_cumprod[-1] == 2.0**-24 and np.isfinite(sched.sigma_max)  # diffusers' convention


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 10, 25, 50, 999])
def test_timesteps_and_sigmas_match_diffusers_euler(spacing, steps):
    ref = EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing=spacing, steps_offset=1)
    ref.set_timesteps(steps)
    ours = DiscreteSchedule(alphas_cumprod=ref.alphas_cumprod)
    torch.testing.assert_close(ours.timesteps(steps, spacing, steps_offset=1), ref.timesteps.double(), rtol=0, atol=1e-3)
    torch.testing.assert_close(ours.sample_sigmas(steps, spacing, steps_offset=1), ref.sigmas.double(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_match_diffusers_ddim(spacing):
    ref = DDIMScheduler(**SD_SCHEDULE, timestep_spacing=spacing, steps_offset=1)
    ref.set_timesteps(20)
    ours = DiscreteSchedule().timesteps(20, spacing, steps_offset=1, round_linspace=True)
    assert ours.long().tolist() == ref.timesteps.tolist()


@pytest.mark.parametrize("sigma_spacing", ["karras", "exponential"])
def test_karras_and_exponential_match_diffusers(sigma_spacing):
    kw = {"use_karras_sigmas": True} if sigma_spacing == "karras" else {"use_exponential_sigmas": True}
    ref = EulerDiscreteScheduler(**SD_SCHEDULE, **kw)
    ref.set_timesteps(25)
    ours = DiscreteSchedule(alphas_cumprod=ref.alphas_cumprod)
    sig = ours.sample_sigmas(25, "linspace", sigma_spacing)
    torch.testing.assert_close(sig, ref.sigmas.double(), rtol=1e-6, atol=0)
    # the network timesteps diffusers derives from those sigmas = our log-sigma interpolation
    torch.testing.assert_close(ours.sigma_to_t(sig[:-1]), ref.timesteps.double(), rtol=0, atol=2e-3)


def test_karras_closed_form():
    s = karras_sigmas(5, 0.1, 10.0, rho=7.0)
    expected = [(10.0 ** (1 / 7) + i / 4 * (0.1 ** (1 / 7) - 10.0 ** (1 / 7))) ** 7 for i in range(5)]
    torch.testing.assert_close(s, torch.tensor(expected, dtype=torch.float64), rtol=1e-14, atol=0)
    e = exponential_sigmas(3, 0.1, 10.0)
    torch.testing.assert_close(e, torch.tensor([10.0, 1.0, 0.1], dtype=torch.float64), rtol=1e-14, atol=0)


def test_sigma_to_t_inverts_t_to_sigma_at_integers():
    sched = DiscreteSchedule()
    t = torch.arange(0, 1000, 37, dtype=torch.float64)
    torch.testing.assert_close(sched.sigma_to_t(sched.t_to_sigma(t)), t, rtol=0, atol=1e-9)
    assert sched.sigma_to_t(torch.tensor([0.0])).item() == 0.0
    assert sched.sigma_to_t(torch.tensor([1e6])).item() == 999.0


@pytest.mark.parametrize(
    "bad, msg",
    [
        (dict(beta_schedule="cosine"), "allowed: scaled_linear, linear, squaredcos_cap_v2"),
        (dict(num_train_timesteps=1), "num_train_timesteps"),
        (dict(beta_start=0.1, beta_end=0.01), "beta_start"),
    ],
)
def test_bad_schedule_config(bad, msg):
    with pytest.raises(ValueError, match=msg):
        ScheduleConfig(**bad)


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_bad_steps(steps):
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        DiscreteSchedule().sample_sigmas(steps)


def test_bad_spacings():
    with pytest.raises(ValueError, match="allowed: leading, trailing, linspace"):
        DiscreteSchedule().sample_sigmas(10, spacing="uniform")
    with pytest.raises(ValueError, match="allowed: discrete, karras, exponential"):
        DiscreteSchedule().sample_sigmas(10, sigma_spacing="polyexponential")
    with pytest.raises(ValueError, match="exceeds"):
        DiscreteSchedule().sample_sigmas(1001)


@pytest.mark.parametrize(
    "sigmas, msg",
    [
        ([1.0], "at least 2"),
        ([1.0, -0.5], ">= 0"),
        ([1.0, 2.0, 0.0], "sorted from high to low"),
        ([float("nan"), 0.0], "finite"),
    ],
)
def test_bad_sigmas(sigmas, msg):
    with pytest.raises(ValueError, match=msg):
        check_sigmas(torch.tensor(sigmas))


@pytest.mark.parametrize("cls_name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("karras", [False, True])
def test_multistep_convention_matches_diffusers(cls_name, spacing, karras):
    import diffusers

    ref = getattr(diffusers, cls_name)(**SD_SCHEDULE, timestep_spacing=spacing, steps_offset=1, use_karras_sigmas=karras)
    ref.set_timesteps(25)
    ours = DiscreteSchedule().sample_sigmas(25, spacing, "karras" if karras else "discrete", 1, convention="multistep")
    # float32 tables in diffusers: 1 - alphas_cumprod[0] loses ~1e-5 relative at sigma_min
    torch.testing.assert_close(ours, ref.sigmas.double(), rtol=2e-5, atol=0)


def test_ddim_convention_rounds_linspace():
    ref = DDIMScheduler(**SD_SCHEDULE, timestep_spacing="linspace")
    ref.set_timesteps(7)
    ours = DiscreteSchedule().sample_sigmas(7, "linspace", convention="ddim", final="sigma_min")
    sched = DiscreteSchedule()
    torch.testing.assert_close(ours[:-1], sched.t_to_sigma(ref.timesteps.double()), rtol=0, atol=0)
    with pytest.raises(ValueError, match="allowed: euler, ddim, multistep"):
        sched.sample_sigmas(7, convention="k-diffusion")
