"""Parity of euler_ancestral, heun and dpm2 with diffusers' Euler-family schedulers (fp64, the fake network).

diffusers' EulerAncestral/Heun/KDPM2 schedulers work in the VE view already (x = x_vp * sqrt(1 + sigma^2)),
so both sides start from the same ``noise * init_noise_sigma`` and their final latents compare directly.
Stochastic samplers draw the same noise tensors in the same order (tests/fakes.NoiseQueue + patch_randn).
"""
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler, HeunDiscreteScheduler, KDPM2DiscreteScheduler

from ldm.denoiser import Denoiser
from ldm.samplers import get_sampler
from ldm.samplers.euler import sample_dpm2, sample_euler_ancestral, sample_heun
from ldm.schedule import DiscreteSchedule, ScheduleConfig
from tests.fakes import SD_SCHEDULE, NoiseQueue, drive_diffusers, fake_net, patch_randn, rel_err

SHAPE = (2, 4, 8, 8)
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}
STEPS = [10, 25, 50]
# (timestep_spacing, sigma spacing[, zero terminal SNR]); linspace is these schedulers' default spacing.
# EulerAncestral has no Karras option, Heun and KDPM2 no rescale_betas_zero_snr (diffusers 0.42).
EULER_A_CASES = [("linspace", "discrete", False), ("trailing", "discrete", False), ("trailing", "discrete", True)]
TWO_EVAL_CASES = [("linspace", "discrete"), ("trailing", "discrete"), ("linspace", "karras")]


def start_noise() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def our_sigmas(sched, schedule: DiscreteSchedule, steps: int, spacing: str, sigma_spacing: str) -> torch.Tensor:
    sigmas = schedule.sample_sigmas(steps, spacing, sigma_spacing, steps_offset=1)
    # diffusers repeats the inner sigmas of its two-evaluation schedulers (Heun, KDPM2)
    theirs = torch.unique_consecutive(sched.sigmas)
    # rtol 5e-5, not 1e-5: diffusers computes 1 - alphas_cumprod in float32, which cancels near t = 0
    # (sigma_min is off by 1.3e-5 relative there); the final latents still agree to 1e-5.
    assert torch.allclose(sigmas.float(), theirs, rtol=5e-5), (sigmas, theirs)
    return sigmas


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("spacing,sigma_spacing,zero_snr", EULER_A_CASES)
def test_euler_ancestral_matches_diffusers(monkeypatch, steps, prediction, spacing, sigma_spacing, zero_snr):
    sched = EulerAncestralDiscreteScheduler(
        **SD_SCHEDULE, prediction_type=prediction, timestep_spacing=spacing, steps_offset=1,
        rescale_betas_zero_snr=zero_snr,
    )
    ours = DiscreteSchedule(ScheduleConfig(zero_terminal_snr=zero_snr))
    den = Denoiser(fake_net, ours, PREDICTIONS[prediction])
    sched.set_timesteps(steps)
    x_init = start_noise() * float(sched.init_noise_sigma)
    patch_randn(monkeypatch, sched, NoiseQueue(SHAPE))
    ref, _ = drive_diffusers(sched, steps, x_init)
    sigmas = our_sigmas(sched, ours, steps, spacing, sigma_spacing)
    x = sample_euler_ancestral(den, x_init, sigmas, noise=NoiseQueue(SHAPE).as_noise_fn())
    assert rel_err(x, ref) < 1e-5


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("spacing,sigma_spacing", TWO_EVAL_CASES)
def test_heun_matches_diffusers(steps, prediction, spacing, sigma_spacing):
    sched = HeunDiscreteScheduler(
        **SD_SCHEDULE, prediction_type=prediction, timestep_spacing=spacing, steps_offset=1,
        use_karras_sigmas=sigma_spacing == "karras",
    )
    ours = DiscreteSchedule(ScheduleConfig())
    den = Denoiser(fake_net, ours, PREDICTIONS[prediction])
    sched.set_timesteps(steps)
    x_init = start_noise() * float(sched.init_noise_sigma)
    ref, _ = drive_diffusers(sched, steps, x_init)
    x = sample_heun(den, x_init, our_sigmas(sched, ours, steps, spacing, sigma_spacing))
    assert rel_err(x, ref) < 1e-5


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("spacing,sigma_spacing", TWO_EVAL_CASES)
def test_dpm2_matches_diffusers(steps, prediction, spacing, sigma_spacing):
    sched = KDPM2DiscreteScheduler(
        **SD_SCHEDULE, prediction_type=prediction, timestep_spacing=spacing, steps_offset=1,
        use_karras_sigmas=sigma_spacing == "karras",
    )
    ours = DiscreteSchedule(ScheduleConfig())
    sched.set_timesteps(steps)
    sigmas = our_sigmas(sched, ours, steps, spacing, sigma_spacing)
    den = Denoiser(fake_net, ours, PREDICTIONS[prediction])
    if sigma_spacing == "karras":
        # KDPM2 rounds the timesteps of its Karras sigmas but not those of the interpolated midpoints:
        # the network sees round(t) at the schedule's sigmas and the fractional t at the midpoints.
        rounded = Denoiser(fake_net, ours, PREDICTIONS[prediction], quantize=True)
        main = set(sigmas.tolist())
        plain = den
        den = lambda x, sigma: (rounded if float(sigma[0]) in main else plain)(x, sigma)  # noqa: E731
    x_init = start_noise() * float(sched.init_noise_sigma)
    ref, _ = drive_diffusers(sched, steps, x_init)
    x = sample_dpm2(den, x_init, sigmas)
    assert rel_err(x, ref) < 1e-5


# ------------------------------------------------------------------------------------------- behaviour


def test_registered_and_callback_once_per_step():
    ours = DiscreteSchedule(ScheduleConfig())
    den = Denoiser(fake_net, ours, "eps")
    sigmas = ours.sample_sigmas(6, "trailing")
    x = start_noise() * float(sigmas[0])
    for name, fn in [("euler_ancestral", sample_euler_ancestral), ("heun", sample_heun), ("dpm2", sample_dpm2)]:
        assert get_sampler(name) is fn
        seen = []
        fn(den, x, sigmas, callback=lambda st: seen.append((st.i, st.sigma, st.sigma_next)))
        assert [s[0] for s in seen] == list(range(6))
        assert [s[1] for s in seen] == sigmas[:-1].tolist() and [s[2] for s in seen] == sigmas[1:].tolist()


def test_euler_ancestral_eta_zero_is_euler():
    # eta = 0 adds no noise: the step is exactly Euler's x + d (sigma_next - sigma), an independent closed form
    ours = DiscreteSchedule(ScheduleConfig())
    den = Denoiser(fake_net, ours, "eps")
    sigmas = ours.sample_sigmas(8, "trailing")
    x0 = start_noise() * float(sigmas[0])
    x = x0
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        x = x + (x - den(x, s)) / s * (s_next - s)

    def no_noise(sigma, sigma_next):
        raise AssertionError("eta=0 must not draw noise")

    assert rel_err(sample_euler_ancestral(den, x0, sigmas, eta=0.0, noise=no_noise), x) < 1e-12


@pytest.mark.parametrize("option,value", [("eta", -0.1), ("eta", float("nan")), ("eta", "1"), ("s_noise", -1.0)])
def test_euler_ancestral_rejects_bad_options(option, value):
    x = start_noise()
    with pytest.raises(ValueError, match=option):
        sample_euler_ancestral(lambda x, s: x, x, torch.tensor([1.0, 0.0]), **{option: value})


@pytest.mark.parametrize("fn", [sample_euler_ancestral, sample_heun, sample_dpm2])
def test_bad_sigmas_and_unknown_options(fn):
    x = start_noise()
    with pytest.raises(ValueError, match="sigmas"):
        fn(lambda x, s: x, x, torch.tensor([0.5, 1.0]))  # increasing
    with pytest.raises(TypeError):
        fn(lambda x, s: x, x, torch.tensor([1.0, 0.0]), bogus=1)
