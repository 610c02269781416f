"""UniPC (ldm/samplers/unipc.py) against diffusers' UniPCMultistepScheduler driven by the same fake network, fp64.

diffusers keeps the VP latent with init_noise_sigma = 1: our start is ``x_vp * sqrt(1 + sigmas[0]^2)`` and its
result converts by ``ve_from_vp(x, sigmas[-1])``. Its alphas_cumprod are float32 and its sigmas are rounded to
float32; ours are float64. Measured over this grid that costs < 3e-6 relative, inside the 1e-5 tolerance.
"""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import UniPCMultistepScheduler

from ldm.denoiser import Denoiser
from ldm.samplers import get_sampler
from ldm.samplers.unipc import sample_unipc
from ldm.schedule import DiscreteSchedule, ScheduleConfig, append_final, karras_sigmas
from tests.fakes import SD_SCHEDULE, drive_diffusers, fake_net, rel_err, ve_from_vp

PREDICTION = {"eps": "epsilon", "v": "v_prediction"}
TOL = 1e-5


class _Scheduler(UniPCMultistepScheduler):
    """Starts at step index 0 every time (``set_begin_index(0)``, what diffusers' img2img pipelines call).

    Without it diffusers looks the first timestep up in its list and, when it is duplicated, takes the *second*
    occurrence. Karras sigmas with a zero-terminal-SNR schedule round to timesteps 999, 999, ... so diffusers
    would skip the first sigma and then fail an assertion on the last step. Elsewhere this changes nothing.
    """

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self.set_begin_index(0)


def unipc_sigmas(ours: DiscreteSchedule, steps: int, spacing: str, karras: bool, final: str = "zero"):
    """Our sigmas for diffusers' UniPC spacings; returns (sigmas (steps + 1,), timesteps (steps,) or None).

    API gap: ``DiscreteSchedule.sample_sigmas`` cannot express these. UniPC (like DPMSolverMultistep) spaces
    'linspace' and 'leading' over steps + 1 points and drops the last (t = 0 or steps_offset), rounds
    'linspace', and takes Karras' [sigma_min, sigma_max] from the whole training table, not from the spaced
    timesteps. ``timesteps(steps + 1, ..., round_linspace=True)[:-1]`` gives the first two exactly.
    """
    if karras:
        return append_final(karras_sigmas(steps, ours.sigma_min, ours.sigma_max), final, ours.sigma_min), None
    if spacing == "trailing":
        t = ours.timesteps(steps, "trailing")
    else:
        t = ours.timesteps(steps + 1, spacing, steps_offset=1, round_linspace=True)[:-1]
    return append_final(ours.t_to_sigma(t), final, ours.sigma_min), t


def run_both(steps=10, spacing="linspace", pred="eps", karras=False, zsnr=False, final="zero", **opts):
    """(ours, reference) final latents in the VE view for one configuration; opts are sample_unipc options."""
    sched = _Scheduler(
        **SD_SCHEDULE, steps_offset=1, timestep_spacing=spacing, prediction_type=PREDICTION[pred],
        use_karras_sigmas=karras, rescale_betas_zero_snr=zsnr, final_sigmas_type=final,
        solver_order=opts.get("order", 2), solver_type=opts.get("variant", "bh2"),
        lower_order_final=opts.get("lower_order_final", True), disable_corrector=list(opts.get("disable_corrector", ())),
    )
    ours = DiscreteSchedule(ScheduleConfig(zero_terminal_snr=zsnr))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref, ref_t = drive_diffusers(sched, steps, noise)
    sigmas, t = unipc_sigmas(ours, steps, spacing, karras, final)
    if t is not None:
        assert torch.equal(t.long(), ref_t)  # the same network timesteps, exactly
    # diffusers' table is float32: up to 2.8e-6 apart, and 1.3e-5 at Karras' sigma_min = sigma(t=0), where its
    # float32 1 - alphas_cumprod[0] = 0.00085 cancels. The final latents still agree within TOL.
    assert torch.allclose(sigmas, sched.sigmas.double(), rtol=2e-5)
    # With Karras sigmas diffusers rounds the network's timestep to an integer: Denoiser(quantize=True).
    den = Denoiser(fake_net, ours, pred, quantize=karras)
    x = sample_unipc(den, noise * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas, **opts)
    return x, ve_from_vp(ref, float(sigmas[-1]))


# ------------------------------------------------------------------------------ parity: the SD grid

GRID = [
    (steps, spacing, pred, karras, zsnr)
    for steps in (10, 25, 50)
    for pred in ("eps", "v")
    for zsnr in (False, True)
    for karras in (False, True)
    for spacing in (("linspace",) if karras else ("linspace", "leading", "trailing"))  # Karras ignores spacing
]


@pytest.mark.parametrize("steps,spacing,pred,karras,zsnr", GRID)
def test_bh2_order2_matches_diffusers(steps, spacing, pred, karras, zsnr):
    x, ref = run_both(steps, spacing, pred, karras, zsnr)
    assert rel_err(x, ref) < TOL


@pytest.mark.parametrize("order", [1, 3])
@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize(
    "spacing,pred,karras,zsnr", [("linspace", "eps", False, False), ("trailing", "v", False, True), ("linspace", "eps", True, False)]
)
def test_orders_1_and_3_match_diffusers(order, steps, spacing, pred, karras, zsnr):
    x, ref = run_both(steps, spacing, pred, karras, zsnr, order=order)
    assert rel_err(x, ref) < TOL


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("pred", ["eps", "v"])
def test_bh1_matches_diffusers(order, pred):
    # final sigma_min: diffusers' bh1 returns NaN on a step to sigma = 0 (B(h) = -h = -inf times 0)
    x, ref = run_both(25, "leading", pred, final="sigma_min", order=order, variant="bh1")
    assert rel_err(x, ref) < TOL


@pytest.mark.parametrize("order", [2, 3])
def test_no_lower_order_final_matches_diffusers(order):
    # final sigma_min: with sigma = 0 diffusers' order >= 2 last step divides by r_k = 0 (inf/NaN)
    x, ref = run_both(10, "trailing", "eps", final="sigma_min", order=order, lower_order_final=False)
    assert rel_err(x, ref) < TOL


@pytest.mark.parametrize("order,lower_order_final", [(1, True), (2, True), (3, True), (2, False)])
def test_karras_repeated_sigma_min_matches_diffusers(order, lower_order_final):
    # Karras with final sigma_min ends on a zero-length step (sigma_min twice): it only runs the last correction.
    # (diffusers' order 3 without lower_order_final is NaN there: its rk = 0 / 0.)
    x, ref = run_both(10, "linspace", "v", True, final="sigma_min", order=order, lower_order_final=lower_order_final)
    assert rel_err(x, ref) < TOL


@pytest.mark.parametrize("order,disable", [(2, (0,)), (2, (1, 4, 7)), (3, range(10)), (1, (2, 3))])
def test_disable_corrector_matches_diffusers(order, disable):
    x, ref = run_both(10, "linspace", "v", order=order, disable_corrector=tuple(disable))
    assert rel_err(x, ref) < TOL


@pytest.mark.parametrize("opts", [dict(lower_order_final=False, order=3), dict(variant="bh1")])
def test_step_to_zero_is_first_order(opts):
    """Where diffusers' step to sigma = 0 is NaN, ours is first order: the x0 prediction of the last evaluation.

    Reference: diffusers' trajectory up to its last model call (all finite) and its own x0 conversion there.
    """
    steps, order = 10, opts.get("order", 2)
    sched = UniPCMultistepScheduler(**SD_SCHEDULE, steps_offset=1, solver_order=order,
                                    solver_type=opts.get("variant", "bh2"), lower_order_final=opts.get("lower_order_final", True))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sched.set_timesteps(steps)
    x_vp = noise.clone()
    for i, t in enumerate(sched.timesteps):
        out = fake_net(x_vp, torch.as_tensor(t, dtype=torch.float64))
        if i == steps - 1:  # its last step would be NaN (bh1) or fail in linalg.solve (order 3, r_k = 0)
            ref = sched.convert_model_output(out, sample=x_vp)  # x0 at the last evaluation
            break
        x_vp = sched.step(out, t, x_vp).prev_sample
    ours = DiscreteSchedule(ScheduleConfig())
    sigmas, _ = unipc_sigmas(ours, steps, "linspace", False)
    x = sample_unipc(Denoiser(fake_net, ours, "eps"), noise * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas, **opts)
    assert rel_err(x, ref) < TOL


# ------------------------------------------------------------------------------ behaviour and options


def test_registered_and_one_call_per_step():
    assert get_sampler("unipc") is sample_unipc
    ours = DiscreteSchedule(ScheduleConfig())
    calls, steps = [], []
    den = Denoiser(fake_net, ours, "eps")

    def counting(x, sigma):
        calls.append(float(sigma[0]))
        return den(x, sigma)

    sigmas, _ = unipc_sigmas(ours, 7, "trailing", False)
    sample_unipc(counting, torch.randn(1, 4, 8, 8, dtype=torch.float64) * float(sigmas[0]), sigmas,
                 callback=lambda st: steps.append((st.i, st.sigma, st.sigma_next)))
    assert calls == pytest.approx(sigmas[:-1].tolist(), rel=1e-12)  # the corrector adds no network call
    assert steps == [(i, float(sigmas[i]), float(sigmas[i + 1])) for i in range(7)]


def test_one_step_is_ddim_to_x0():
    # A single step to sigma = 0 returns the x0 prediction (closed form of eq. (1) with h = inf).
    ours = DiscreteSchedule(ScheduleConfig())
    den = Denoiser(fake_net, ours, "v")
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64) * 14.6
    sigmas = torch.tensor([14.6, 0.0], dtype=torch.float64)
    assert torch.equal(sample_unipc(den, x, sigmas, order=3), den(x, torch.tensor(14.6, dtype=torch.float64)))


@pytest.mark.parametrize(
    "opts,match",
    [
        (dict(order=0), "order must be an integer in 1..3"),
        (dict(order=4), "order must be an integer in 1..3"),
        (dict(order=2.0), "order must be an integer in 1..3"),
        (dict(order=True), "order must be an integer in 1..3"),
        (dict(variant="bh3"), "variant: unknown value 'bh3'; allowed: bh1, bh2"),
        (dict(lower_order_final=1), "lower_order_final must be True or False"),
        (dict(disable_corrector=3), "disable_corrector must be a collection"),
        (dict(disable_corrector="0"), "disable_corrector must be a collection"),
        (dict(disable_corrector=(0, -1)), "disable_corrector must hold step indices"),
        (dict(disable_corrector=(1.0,)), "disable_corrector must hold step indices"),
    ],
)
def test_bad_options(opts, match):
    den = Denoiser(fake_net, DiscreteSchedule(ScheduleConfig()), "eps")
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(".", r"\.")):
        sample_unipc(den, torch.zeros(1, 4, 8, 8), torch.tensor([1.0, 0.5, 0.0]), **opts)


@pytest.mark.parametrize("sigmas", [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [2.0, 1.0, 1.0, 0.5], [2.0, 1.0, 1.5, 0.0]])
def test_bad_sigmas(sigmas):
    den = Denoiser(fake_net, DiscreteSchedule(ScheduleConfig()), "eps")
    with pytest.raises(ValueError, match="sigmas"):
        sample_unipc(den, torch.zeros(1, 4, 8, 8), torch.tensor(sigmas))
