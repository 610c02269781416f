"""Parity of sample_plms / sample_lms with diffusers' PNDMScheduler(skip_prk_steps=True) / LMSDiscreteScheduler.

Both sides see the same fake network. PNDM keeps x in the VP view from init_noise_sigma = 1 (our start is
x_vp * sqrt(1 + sigmas[0]^2), its result goes through ve_from_vp); LMS is already in the VE view and both start
from the same tensor (diffusers' init_noise_sigma). Our DiscreteSchedule comes from the same ScheduleConfig in
float64; diffusers' float32 tables (and LMS's float32 quadrature of the coefficients) differ by ~1e-6 relative.

PNDM steps from t to t - T // steps, which is the next timestep only for uniform spacings ('leading', or
'trailing' with T % steps == 0); its 'linspace' trajectory is not one sigma sequence, so it is not tested.
For v-prediction diffusers' PLMS extrapolates the raw network output v, hence extrapolate='v' there.
"""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import LMSDiscreteScheduler, PNDMScheduler

from ldm.denoiser import Denoiser
from ldm.samplers import STOCHASTIC, get_sampler
from ldm.samplers.multistep import lagrange_integral, sample_lms, sample_plms
from ldm.schedule import DiscreteSchedule, ScheduleConfig
from tests.fakes import SD_SCHEDULE, drive_diffusers, fake_net, rel_err, ve_from_vp

SHAPE = (2, 4, 8, 8)
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}


def x_init() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def denoiser(prediction: str = "eps") -> Denoiser:
    return Denoiser(fake_net, DiscreteSchedule(ScheduleConfig()), prediction)


# ------------------------------------------------------------------------------------------------ PLMS


@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing,offset,alpha_one", [("leading", 1, False), ("trailing", 0, False), ("leading", 1, True)])
def test_plms_matches_diffusers(steps, prediction_type, spacing, offset, alpha_one):
    sched = PNDMScheduler(
        **SD_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=alpha_one, steps_offset=offset,
        timestep_spacing=spacing, prediction_type=prediction_type,
    )
    ref, _ = drive_diffusers(sched, steps, x_init())
    den = denoiser(PREDICTIONS[prediction_type])
    sigmas = den.schedule.sample_sigmas(steps, spacing, steps_offset=offset, final="zero" if alpha_one else "sigma_min")
    x = sample_plms(den, x_init() * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas, extrapolate=PREDICTIONS[prediction_type])
    assert rel_err(x, ve_from_vp(ref, float(sigmas[-1]))) < 1e-5


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_plms_warm_up_matches_diffusers(steps):
    # 1 step: a single Euler step; 2 steps: Heun + 2nd order; 3 steps: adds the 3rd-order formula
    sched = PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True, steps_offset=1)
    ref, timesteps = drive_diffusers(sched, steps, x_init())
    assert len(timesteps) == steps + (steps > 1)  # diffusers' duplicated second timestep
    den = denoiser()
    sigmas = den.schedule.sample_sigmas(steps, "leading", steps_offset=1, final="sigma_min")
    x = sample_plms(den, x_init() * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas)
    assert rel_err(x, ve_from_vp(ref, float(sigmas[-1]))) < 1e-5


def test_plms_extrapolate_eps_is_default_and_differs_from_v():
    den = denoiser("v")
    sigmas = den.schedule.sample_sigmas(10, "leading", steps_offset=1)
    x = x_init() * math.sqrt(1 + float(sigmas[0]) ** 2)
    a, b = sample_plms(den, x, sigmas), sample_plms(den, x, sigmas, extrapolate="eps")
    assert torch.equal(a, b)
    assert rel_err(sample_plms(den, x, sigmas, extrapolate="v"), a) > 1e-4  # a different method, not rounding


# ------------------------------------------------------------------------------------------------- LMS


@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("spacing,offset", [("linspace", 0), ("leading", 1)])
def test_lms_matches_diffusers(steps, prediction_type, karras, spacing, offset):
    sched = LMSDiscreteScheduler(
        **SD_SCHEDULE, timestep_spacing=spacing, steps_offset=offset, prediction_type=prediction_type,
        use_karras_sigmas=karras,
    )
    sched.set_timesteps(steps)
    start = x_init() * float(sched.init_noise_sigma)
    ref, _ = drive_diffusers(sched, steps, start)
    den = denoiser(PREDICTIONS[prediction_type])
    sigmas = den.schedule.sample_sigmas(steps, spacing, "karras" if karras else "discrete", steps_offset=offset)
    # diffusers' sigma table comes from float32 alphas_cumprod: near t = 0, 1 - a ~ 1e-3 carries ~1.3e-5 relative error
    assert torch.allclose(sigmas.float(), sched.sigmas, rtol=1e-4)
    x = sample_lms(den, start, sigmas)
    assert rel_err(x, ref) < 1e-5


@pytest.mark.parametrize("order", [1, 2, 3])
def test_lms_lower_orders_match_diffusers(order):
    sched = LMSDiscreteScheduler(**SD_SCHEDULE)
    sched.set_timesteps(10)
    start = x_init() * float(sched.init_noise_sigma)
    ref, _ = drive_diffusers(sched, 10, start, step_kwargs={"order": order})
    den = denoiser()
    x = sample_lms(den, start, den.schedule.sample_sigmas(10, "linspace"), order=order)
    assert rel_err(x, ref) < 1e-5


def test_lagrange_integral_closed_form():
    # independent check: Adams-Bashforth on a uniform grid, step h = -1 from node 0 with nodes 0, 1, 2, 3
    nodes = [0.0, 1.0, 2.0, 3.0]
    coeffs = [lagrange_integral(nodes, j, 0.0, -1.0) for j in range(4)]
    expected = [-55 / 24, 59 / 24, -37 / 24, 9 / 24]
    assert all(abs(c - e) < 1e-14 for c, e in zip(coeffs, expected))


# ------------------------------------------------------------------------------------ contract and input


def test_registered_as_deterministic():
    assert get_sampler("plms") is sample_plms and get_sampler("lms") is sample_lms
    assert not {"plms", "lms"} & STOCHASTIC


@pytest.mark.parametrize("sampler", [sample_plms, sample_lms])
def test_single_step_to_zero_lands_on_x0_prediction(sampler):
    den = denoiser()
    steps = []
    x = sampler(den, x_init() * 5.0, torch.tensor([5.0, 0.0], dtype=torch.float64), callback=steps.append)
    assert len(steps) == 1 and steps[0].sigma_next == 0.0
    assert rel_err(x, steps[0].denoised) < 1e-14  # x - sigma * eps: fp64 rounding only


@pytest.mark.parametrize("sampler", [sample_plms, sample_lms])
def test_one_callback_per_step(sampler):
    den = denoiser()
    sigmas = den.schedule.sample_sigmas(6, "leading", steps_offset=1)
    steps = []
    sampler(den, x_init() * float(sigmas[0]), sigmas, callback=steps.append)
    assert [s.i for s in steps] == list(range(6))


@pytest.mark.parametrize("order", [0, -1, 2.0, True, "4"])
def test_lms_bad_order_raises(order):
    with pytest.raises(ValueError, match="order"):
        sample_lms(denoiser(), torch.zeros(SHAPE, dtype=torch.float64), torch.tensor([1.0, 0.0]), order=order)


def test_lms_repeated_sigma_raises():
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_lms(denoiser(), torch.zeros(SHAPE, dtype=torch.float64), torch.tensor([2.0, 1.0, 1.0, 0.0]))


def test_plms_bad_extrapolate_raises():
    with pytest.raises(ValueError, match="extrapolate"):
        sample_plms(denoiser(), torch.zeros(SHAPE, dtype=torch.float64), torch.tensor([1.0, 0.0]), extrapolate="epsilon")


@pytest.mark.parametrize("sampler", [sample_plms, sample_lms])
def test_zero_sigma_before_last_raises(sampler):
    with pytest.raises(ValueError, match="only the last"):
        sampler(denoiser(), torch.zeros(SHAPE, dtype=torch.float64), torch.tensor([1.0, 0.0, 0.0]))
