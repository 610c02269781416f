"""DPM-Solver++ multistep samplers: 2M, 2M SDE and 3M SDE (Lu et al. 2022, "DPM-Solver++", arXiv:2211.01095).

In the VE view (ldm/schedule.py) the half log-SNR is lambda = -log sigma and a step sigma -> sigma_next has
h = lambda_next - lambda = log(sigma / sigma_next). DPM-Solver++ integrates the data prediction D = x0:

    ODE (eta = 0):  x' = e^{-h} x + (1 - e^{-h}) D0 + ...          (first order = DDIM; 2M is the paper's Alg. 2)
    SDE (eta = 1):  x' = e^{-2h} x + (1 - e^{-2h}) D0 + ... + sigma' sqrt(1 - e^{-2h}) z
                    (the reverse diffusion SDE solved as diffusers' 'sde-dpmsolver++', Lu et al. PR #3344)

k-diffusion's ``eta`` interpolates: with h_eta = (1 + eta) h the update is
``x' = (sigma'/sigma) e^{-eta h} x - expm1(-h_eta) D0 + [higher orders] + s_noise sigma' sqrt(-expm1(-2 eta h)) z``.
The higher orders use earlier steps' D (linear multistep, phi_2(u) = expm1(-u)/u + 1, phi_3(u) = phi_2(u)/u - 1/2):

    order 2, midpoint:  + 1/2 (-expm1(-h_eta)) D1            D1 = (D0 - D_prev) / r,  r = h_prev / h
    order 2, heun:      + phi_2(h_eta) D1
    order 3:            + phi_2(h_eta) D1 - phi_3(h_eta) D2   (D1, D2 from divided differences, k-diffusion)

Which order each step uses follows diffusers' DPMSolverMultistepScheduler.step exactly: orders ramp up 1, 2, 3
as history accumulates; the final step is first order when it ends at sigma = 0 (it then returns D0 exactly),
or when ``euler_at_final``, or when ``lower_order_final`` and there are fewer than 15 steps; with
``lower_order_final`` and fewer than 15 steps the second-to-last step is at most second order.

3M ``third_order``: diffusers (0.42) and k-diffusion disagree on the D2 term of the SDE. ``'diffusers'``
(reproduces DPMSolverMultistepScheduler(algorithm_type='sde-dpmsolver++', solver_order=3)) uses its
coefficient with 2h written as h_eta, ``(1 - e^{-h_eta} - h_eta) / h_eta^2 - 1/2 = -(phi_3(h_eta) + 1)``.
``'k-diffusion'`` (default, the correct one) uses ``-phi_3(h_eta)``, the coefficient of Lu's multistep third order, which is also what
diffusers' deterministic 'dpmsolver++' solver_order=3 uses: with eta = 0 and ``third_order='k-diffusion'`` this
sampler is that scheduler (tested). diffusers' extra ``-D2`` is O(1) where the other terms are O(h) and looks
like a sign slip from the port of the ODE formula (diffusers PR #9104).
k-diffusion's own ``sample_dpmpp_3m_sde`` is ``solver_type='heun', third_order='k-diffusion',
lower_order_final=False``.
"""
from __future__ import annotations

import math

from torch import Tensor

from ..schedule import check_choice
from .common import Callback, DenoiseFn, NoiseFn, Step, prepare, randn_noise, register, sigma_vec
from .common import check_nonnegative

SOLVER_TYPES = ("midpoint", "heun")
THIRD_ORDERS = ("diffusers", "k-diffusion")
LOWER_ORDER_FINAL_STEPS = 15  # diffusers: lower_order_final only acts below this many steps


def _flag(name: str, value: bool) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def step_order(i: int, n: int, max_order: int, sigma_next: float, lower_order_final: bool, euler_at_final: bool) -> int:
    """The order of step i of n, as diffusers' DPMSolverMultistepScheduler.step chooses it."""
    order = min(max_order, i + 1)  # warm-up: only i earlier model outputs exist
    few = lower_order_final and n < LOWER_ORDER_FINAL_STEPS
    if i == n - 1 and (sigma_next == 0 or euler_at_final or few):
        return 1
    if i == n - 2 and few:
        return min(order, 2)
    return order


def phi_2(u: float) -> float:
    return math.expm1(-u) / u + 1


def phi_3(u: float) -> float:
    return phi_2(u) / u - 0.5


def _multistep(
    denoise: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    noise: NoiseFn | None,
    callback: Callback | None,
    max_order: int,
    eta: float,
    s_noise: float,
    solver_type: str,
    lower_order_final: bool,
    euler_at_final: bool,
    third_order: str = "k-diffusion",
) -> Tensor:
    """The shared DPM-Solver++ multistep loop (see the module docstring for the formulas)."""
    s = prepare(x, sigmas)
    eta = check_nonnegative("eta", eta)
    s_noise = check_nonnegative("s_noise", s_noise)
    check_choice("solver_type", solver_type, SOLVER_TYPES)
    check_choice("third_order", third_order, THIRD_ORDERS)
    _flag("lower_order_final", lower_order_final)
    _flag("euler_at_final", euler_at_final)
    if any(a == b > 0 for a, b in zip(s, s[1:])):
        raise ValueError(f"sigmas must be strictly decreasing while > 0 for DPM-Solver++ (a repeated sigma is a zero "
                         f"step in lambda), got {s}")
    stochastic = eta > 0 and s_noise > 0
    if stochastic:
        noise = noise or randn_noise(x)
    n = len(s) - 1
    history: list[Tensor] = []  # (B, C, H, W) data predictions of earlier steps, newest last
    hs: list[float] = []  # their step sizes in lambda, newest last
    for i in range(n):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = denoise(x, sigma_vec(x, sigma))  # D0, (B, C, H, W)
        if callback is not None:
            callback(Step(i, x, sigma, sigma_next, denoised))
        order = step_order(i, n, max_order, sigma_next, lower_order_final, euler_at_final)
        if sigma_next == 0:  # h = inf: every solver lands on the data prediction
            x, h = denoised, math.inf
        else:
            h = math.log(sigma) - math.log(sigma_next)
            h_eta = h * (1 + eta)
            one_minus = -math.expm1(-h_eta)  # 1 - e^{-h_eta}
            x_new = (sigma_next / sigma * math.exp(-eta * h)) * x + one_minus * denoised
            if order == 2:
                d1 = (denoised - history[-1]) * (h / hs[-1])  # D1 = (D0 - D_prev) / r0
                x_new = x_new + (phi_2(h_eta) if solver_type == "heun" else 0.5 * one_minus) * d1
            elif order == 3:
                r0, r1 = hs[-1] / h, hs[-2] / h
                d1_0 = (denoised - history[-1]) / r0
                d1_1 = (history[-1] - history[-2]) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                c2 = -phi_3(h_eta) - (1.0 if third_order == "diffusers" else 0.0)
                x_new = x_new + phi_2(h_eta) * d1 + c2 * d2
            if stochastic:
                x_new = x_new + noise(sigma, sigma_next).to(x) * (s_noise * sigma_next * math.sqrt(-math.expm1(-2 * eta * h)))
            x = x_new
        history = (history + [denoised])[-2:]
        hs = (hs + [h])[-2:]
    return x


@register("dpmpp_2m")
def sample_dpmpp_2m(
    denoise: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
    euler_at_final: bool = False,
) -> Tensor:
    """DPM-Solver++(2M), deterministic (paper Alg. 2; diffusers' 'dpmsolver++' with solver_order=2).

    ``solver_type`` 'midpoint' (default, = k-diffusion ``sample_dpmpp_2m``) or 'heun' picks the second-order
    correction; ``lower_order_final`` / ``euler_at_final`` as diffusers (module docstring).
    """
    return _multistep(denoise, x, sigmas, None, callback, 2, 0.0, 0.0, solver_type, lower_order_final, euler_at_final)


@register("dpmpp_2m_sde", stochastic=True)
def sample_dpmpp_2m_sde(
    denoise: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
    euler_at_final: bool = False,
) -> Tensor:
    """DPM-Solver++(2M) SDE (diffusers' 'sde-dpmsolver++' solver_order=2; k-diffusion ``sample_dpmpp_2m_sde``).

    ``eta`` = 1 (default) solves the reverse diffusion SDE, 0 gives the 2M ODE; ``s_noise`` scales the noise.
    """
    return _multistep(denoise, x, sigmas, noise, callback, 2, eta, s_noise, solver_type, lower_order_final, euler_at_final)


@register("dpmpp_3m_sde", stochastic=True)
def sample_dpmpp_3m_sde(
    denoise: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
    euler_at_final: bool = False,
    third_order: str = "k-diffusion",
) -> Tensor:
    """DPM-Solver++(3M) SDE (diffusers' 'sde-dpmsolver++' solver_order=3; k-diffusion ``sample_dpmpp_3m_sde``).

    ``third_order`` 'k-diffusion' (default) or 'diffusers' picks the D2 coefficient (module docstring);
    ``solver_type`` picks the order-2 warm-up steps; ``eta`` and ``s_noise`` as in ``sample_dpmpp_2m_sde``.
    """
    return _multistep(
        denoise, x, sigmas, noise, callback, 3, eta, s_noise, solver_type, lower_order_final, euler_at_final, third_order
    )
