"""Parity of dpmpp_2m, dpmpp_2m_sde and dpmpp_3m_sde with diffusers' DPMSolverMultistepScheduler (fp64, fake net).

DPMSolverMultistep keeps x in the VP view (init_noise_sigma = 1): our start is x_vp * sqrt(1 + sigmas[0]^2)
and its result converts back by ve_from_vp(x, sigmas[-1]). Its step placement (N of N + 1 rounded points for
linspace/leading; Karras over the whole training table, with rounded timesteps) is sample_sigmas'
``convention='multistep'``.
"""
import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from scipy.integrate import quad

from ldm.denoiser import Denoiser
from ldm.samplers import get_sampler
from ldm.samplers.dpmpp import sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_3m_sde
from ldm.schedule import DiscreteSchedule, ScheduleConfig
from tests.fakes import SD_SCHEDULE, NoiseQueue, drive_diffusers, fake_net, patch_randn, rel_err, ve_from_vp

SHAPE = (2, 4, 8, 8)
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}
STEPS = [10, 25, 50]
SOLVERS = {  # name -> (algorithm_type, solver_order, our sampler, its options)
    "2m": ("dpmsolver++", 2, sample_dpmpp_2m, {}),
    "2m_sde": ("sde-dpmsolver++", 2, sample_dpmpp_2m_sde, {}),
    # diffusers' SDE D2 coefficient is off by -1 (ldm/samplers/dpmpp.py docstring); reproduced on request
    "3m_sde": ("sde-dpmsolver++", 3, sample_dpmpp_3m_sde, dict(third_order="diffusers")),
    # the deterministic 3M: eta = 0 with Lu's D2 coefficient (ldm/samplers/dpmpp.py, third_order)
    "3m": ("dpmsolver++", 3, sample_dpmpp_3m_sde, dict(eta=0.0, third_order="k-diffusion")),
}
# (timestep_spacing, sigma spacing, zero terminal SNR); linspace is DPMSolverMultistep's default spacing
CASES = [
    ("linspace", "discrete", False),
    ("trailing", "discrete", False),
    ("linspace", "karras", False),
    ("trailing", "discrete", True),  # zero terminal SNR goes with trailing spacing (Lin et al. 2023)
]


def start_noise() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def run_pair(monkeypatch, solver, prediction, steps, spacing, sigma_spacing, zero_snr, **extra):
    """(ours, diffusers) final VE latents for one configuration; ``extra`` goes to the scheduler and sampler."""
    algorithm, order, sample, options = SOLVERS[solver]
    sched = DPMSolverMultistepScheduler(
        **SD_SCHEDULE, algorithm_type=algorithm, solver_order=order, prediction_type=prediction,
        timestep_spacing=spacing, steps_offset=1, use_karras_sigmas=sigma_spacing == "karras",
        rescale_betas_zero_snr=zero_snr, **extra,
    )
    final = extra.pop("final_sigmas_type", "zero")
    ours = DiscreteSchedule(ScheduleConfig(zero_terminal_snr=zero_snr))
    if zero_snr:
        # diffusers rescales the betas in float32: its sigmas differ from our float64 ones by up to 1.9e-5
        # relative near t = 999, enough to move the 3M SDE result by 1.2e-5. Compare the solvers on its table.
        ours = DiscreteSchedule(alphas_cumprod=sched.alphas_cumprod)
    # With Karras sigmas DPMSolverMultistep rounds the network's timestep to an integer (set_timesteps:
    # timesteps.round()) while stepping with the unrounded sigmas, so our Denoiser must quantize as well.
    den = Denoiser(fake_net, ours, PREDICTIONS[prediction], quantize=sigma_spacing == "karras")
    sigmas = ours.sample_sigmas(steps, spacing, sigma_spacing, steps_offset=1, final=final, convention="multistep")
    sched.set_timesteps(steps)
    # rtol 5e-5, not 1e-5: diffusers computes 1 - alphas_cumprod in float32, which cancels near t = 0
    # (sigma_min is off by 1.3e-5 relative); the final latents still agree to 1e-5.
    assert torch.allclose(sigmas.float(), sched.sigmas, rtol=5e-5), (sigmas, sched.sigmas)
    noise = start_noise()
    patch_randn(monkeypatch, sched, NoiseQueue(SHAPE))
    ref, _ = drive_diffusers(sched, steps, noise)
    noise_fn = NoiseQueue(SHAPE).as_noise_fn() if algorithm.startswith("sde") else None
    x = sample(den, ve_from_vp(noise, float(sigmas[0])), sigmas, noise=noise_fn, **options, **extra)
    return x, ve_from_vp(ref, float(sigmas[-1]))


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("spacing,sigma_spacing,zero_snr", CASES)
@pytest.mark.parametrize("solver", SOLVERS)
def test_matches_diffusers(monkeypatch, solver, prediction, steps, spacing, sigma_spacing, zero_snr):
    x, ref = run_pair(monkeypatch, solver, prediction, steps, spacing, sigma_spacing, zero_snr)
    assert rel_err(x, ref) < 1e-5


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize(
    "options",
    [
        dict(solver_type="heun"),
        dict(final_sigmas_type="sigma_min"),  # lower_order_final: the last step first order (< 15 steps)
        dict(final_sigmas_type="sigma_min", lower_order_final=False),
        dict(euler_at_final=True, final_sigmas_type="sigma_min"),
    ],
    ids=["heun", "sigma_min", "sigma_min-no_lower_order_final", "euler_at_final"],
)
@pytest.mark.parametrize("steps", [10, 25])
def test_options_match_diffusers(monkeypatch, solver, options, steps):
    x, ref = run_pair(monkeypatch, solver, "epsilon", steps, "trailing", "discrete", False, **options)
    assert rel_err(x, ref) < 1e-5


@pytest.mark.parametrize("steps", [10, 25])
def test_leading_spacing_matches_diffusers(monkeypatch, steps):
    x, ref = run_pair(monkeypatch, "2m", "epsilon", steps, "leading", "discrete", False)
    assert rel_err(x, ref) < 1e-5


# ----------------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("third_order", ["diffusers", "k-diffusion"])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
def test_third_order_step_is_exact_for_linear_data_prediction(eta, solver_type, third_order):
    """With D(lambda) = a + b lambda (lambda = -log sigma) and no noise, D2 = 0 and a third-order step is exact:
    x' = (sigma'/sigma) e^{-eta h} x + int_{lambda}^{lambda'} k e^{-k (lambda' - l)} D(l) dl with k = 1 + eta
    (the reverse SDE for eta = 1, the probability-flow ODE for eta = 0), evaluated here by quadrature."""
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(2))

    def denoise(x, sigma):
        return a - b * math.log(float(sigma[0]))

    sigmas = torch.tensor([8.0, 3.0, 1.2, 0.4], dtype=torch.float64)
    x_start = start_noise() * 8.0
    zeros = lambda s, s_next: torch.zeros(SHAPE, dtype=torch.float64)  # noqa: E731
    opts = dict(eta=eta, noise=zeros, lower_order_final=False, solver_type=solver_type, third_order=third_order)
    x2 = sample_dpmpp_3m_sde(denoise, x_start, sigmas[:3], **opts)  # the same first two steps
    x3 = sample_dpmpp_3m_sde(denoise, x_start, sigmas, **opts)  # + one third-order step
    lam2, lam3 = -math.log(1.2), -math.log(0.4)
    k = 1 + eta
    w = [quad(lambda l, p=p: k * math.exp(-k * (lam3 - l)) * l**p, lam2, lam3, epsabs=0, epsrel=1e-13)[0] for p in (0, 1)]
    expected = (0.4 / 1.2) * math.exp(-eta * (lam3 - lam2)) * x2 + w[0] * a + w[1] * b
    assert rel_err(x3, expected) < 1e-12  # float64 round-off only


def test_final_step_to_zero_returns_the_data_prediction():
    ours = DiscreteSchedule(ScheduleConfig())
    den = Denoiser(fake_net, ours, "eps")
    sigmas = torch.tensor([2.0, 0.0], dtype=torch.float64)
    x = start_noise() * 2.0
    for fn in (sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_3m_sde):
        assert torch.equal(fn(den, x, sigmas), den(x, 2.0))


# -------------------------------------------------------------------------------------------- behaviour


def test_registered_and_callback_once_per_step():
    ours = DiscreteSchedule(ScheduleConfig())
    den = Denoiser(fake_net, ours, "eps")
    sigmas = ours.sample_sigmas(6, "trailing")
    x = start_noise() * float(sigmas[0])
    for name, fn in [("dpmpp_2m", sample_dpmpp_2m), ("dpmpp_2m_sde", sample_dpmpp_2m_sde), ("dpmpp_3m_sde", sample_dpmpp_3m_sde)]:
        assert get_sampler(name) is fn
        seen = []
        fn(den, x, sigmas, callback=lambda st: seen.append((st.i, st.sigma, st.sigma_next)))
        assert seen == list(zip(range(6), sigmas[:-1].tolist(), sigmas[1:].tolist()))


@pytest.mark.parametrize(
    "fn,option,value",
    [
        (sample_dpmpp_2m_sde, "eta", -1.0),
        (sample_dpmpp_3m_sde, "eta", float("inf")),
        (sample_dpmpp_2m_sde, "s_noise", -0.5),
        (sample_dpmpp_2m, "solver_type", "rk4"),
        (sample_dpmpp_3m_sde, "third_order", "exact"),
        (sample_dpmpp_2m, "lower_order_final", "yes"),
        (sample_dpmpp_2m_sde, "euler_at_final", 1),
    ],
)
def test_rejects_bad_options(fn, option, value):
    x = start_noise()
    with pytest.raises(ValueError, match=option):
        fn(lambda x, s: x, x, torch.tensor([1.0, 0.5, 0.0]), **{option: value})


@pytest.mark.parametrize("fn", [sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_3m_sde])
def test_bad_sigmas_and_unknown_options(fn):
    with pytest.raises(ValueError, match="sigmas"):
        fn(lambda x, s: x, start_noise(), torch.tensor([0.5, 1.0]))  # increasing
    with pytest.raises(ValueError, match="sigmas"):
        fn(lambda x, s: x, start_noise(), torch.tensor([2.0, 1.0, 1.0, 0.0]))  # h = 0 would divide by zero
    with pytest.raises(TypeError):
        fn(lambda x, s: x, start_noise(), torch.tensor([1.0, 0.0]), order=3)
