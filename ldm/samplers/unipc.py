"""UniPC: UniP predictor + UniC corrector, multistep, data prediction (Zhao et al. 2023, "UniPC: A Unified
Predictor-Corrector Framework for Fast Sampling of Diffusion Models", Algorithms 2 and 3 with B(h) of sec. 3.3).

This is the sampler of diffusers' ``UniPCMultistepScheduler`` with ``predict_x0=True`` (the Stable Diffusion
setting), written over sigmas in the VE view ``x = x0 + sigma * eps`` (ldm/schedule.py).

The VE view. diffusers keeps the VP latent ``x_vp = alpha x0 + s eps`` with ``alpha = 1 / sqrt(1 + sigma^2)``,
``s = sigma * alpha`` and half-log-SNR ``lambda = log(alpha / s) = -log(sigma)``. Its data-prediction step from
``s0`` to ``t`` (``h = lambda_t - lambda_s0 = log(sigma_s0 / sigma_t)``) is

    x_vp_t = (s_t / s_s0) x_vp_s0 - alpha_t expm1(-h) m0 - alpha_t B(h) sum_k rho_k D_k

where ``m`` are x0 predictions and ``D_k`` their divided differences. Divide by ``alpha_t``: since
``x = x_vp / alpha`` and ``s_t / (s_s0 alpha_t) = sigma_t / (sigma_s0 alpha_s0)``, the VE step is

    x_t = (sigma_t / sigma_s0) x_s0 - expm1(-h) m0 - B(h) sum_k rho_k D_k              (1)

i.e. exactly the same formula without the alpha factors; every coefficient depends only on lambda = -log sigma,
and the x0 predictions are the same in both views. So this sampler reproduces diffusers' trajectory with
``x_ve = x_vp * sqrt(1 + sigma^2)`` at every step. With ``B(h) = expm1(-h)`` ("bh2") and first order, (1) is
DDIM / DPM-Solver++(1): ``x_t = x0 + (sigma_t / sigma_s0) (x_s0 - x0)``.

The corrector UniC (Algorithm 3) reuses the network evaluation that the next step needs anyway: after the
predictor gives x_{i+1}, the model is evaluated there, and the same evaluation corrects x_{i+1} (re-running step i
with one more difference, ``m(x_{i+1}) - m_i``). The corrected latent continues; the evaluation at the
uncorrected point is what enters the history, as in the paper and diffusers. No extra network calls.

Differences from diffusers, on purpose:
- a step to sigma = 0 (lambda = inf) is always first order, ``x = m0``. diffusers does that only through
  ``lower_order_final``; with ``lower_order_final=False`` its divided differences divide by
  ``r_k = (lambda_k - lambda_s0) / h = 0`` and it returns inf/NaN, and with ``solver_type='bh1'`` its
  ``B(h) = -h = -inf`` multiplies 0 and gives NaN.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor

from .common import Callback, DenoiseFn, NoiseFn, Step, prepare, register, sigma_vec

VARIANTS = ("bh1", "bh2")  # B(h) = h (bh1, recommended in the paper for unconditional) | e^h - 1 (bh2)
MAX_ORDER = 3


def _lam(sigma: float) -> float:
    """Half-log-SNR of a VP model in the VE view: lambda = log(alpha / s) = -log(sigma); inf at sigma = 0."""
    return -math.log(sigma) if sigma > 0 else math.inf


def _b_h(variant: str, hh: float) -> float:
    return hh if variant == "bh1" else math.expm1(hh)


def _phi_rhs(h: float, order: int, variant: str) -> tuple[float, list[float]]:
    """(B(h), [b_1 .. b_order]): right-hand sides of the UniPC order conditions (paper eq. 8 and Alg. 2/3).

    Data prediction integrates in -lambda, so ``hh = -h``. ``b_i = i! * h phi_{i+1}(hh) / B(hh)`` with the
    exponential-integrator phi functions built by the recursion ``phi_{k+1} = (phi_k - 1/k!) / hh``;
    same recursion and order of operations as diffusers' ``multistep_uni_p_bh_update``.
    """
    hh = -h
    h_phi_k = math.expm1(hh) / hh - 1
    b_h = _b_h(variant, hh)
    factorial, b = 1, []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return b_h, b


def _solve(rks: list[float], b: list[float]) -> list[float]:
    """rho solving sum_k rho_k r_k^(i-1) = b_i, i = 1 .. len(rks) (the Vandermonde system R rho = b)."""
    R = torch.tensor([[r ** (i - 1) for r in rks] for i in range(1, len(rks) + 1)], dtype=torch.float64)
    return torch.linalg.solve(R, torch.tensor(b, dtype=torch.float64)).tolist()


def _unipc_update(
    x: Tensor, sigma_s0: float, sigma_t: float, ms: list[Tensor], lams: list[float], order: int, variant: str,
    m_t: Tensor | None = None,
) -> Tensor:
    """One UniP step (``m_t is None``, Algorithm 2) or UniC correction (``m_t`` given, Algorithm 3), eq. (1).

    ``x`` (B, C, H, W) is the latent at sigma_s0; ``ms`` / ``lams`` the x0 predictions and lambdas so far,
    newest last (``ms[-1]`` at sigma_s0); ``order`` p uses p - 1 past differences (plus m_t for UniC).
    """
    lam_s0, lam_t = lams[-1], _lam(sigma_t)
    h = lam_t - lam_s0
    m0 = ms[-1]
    x_t = (sigma_t / sigma_s0) * x - math.expm1(-h) * m0  # (B, C, H, W) DDIM / DPM-Solver++(1) part
    if m_t is None and order == 1:
        return x_t  # also the step to sigma = 0, where h = inf (see the module docstring)
    rks = [(lams[-1 - k] - lam_s0) / h for k in range(1, order)]  # r_k < 0: past points
    ds = [(ms[-1 - k] - m0) / r for k, r in zip(range(1, order), rks)]  # D_k, (B, C, H, W) each
    b_h, b = _phi_rhs(h, order, variant)
    if m_t is None:  # UniP-p: p - 1 differences; diffusers (and the paper's code) fix rho = 1/2 at p = 2
        rhos = [0.5] if order == 2 else _solve(rks, b[:-1])
    else:  # UniC-p: one more difference, towards the new evaluation m_t at r = 1; rho = 1/2 at p = 1
        rhos = [0.5] if order == 1 else _solve(rks + [1.0], b)
        ds = ds + [m_t - m0]
    res = sum(rho * d for rho, d in zip(rhos, ds))  # (B, C, H, W)
    return x_t - b_h * res


def _check_options(order: int, variant: str, lower_order_final: bool, disable_corrector) -> set[int]:
    if not isinstance(order, int) or isinstance(order, bool) or not 1 <= order <= MAX_ORDER:
        raise ValueError(f"unipc: order must be an integer in 1..{MAX_ORDER}, got {order!r}")
    if variant not in VARIANTS:
        raise ValueError(f"unipc: variant: unknown value {variant!r}; allowed: {', '.join(VARIANTS)}")
    if not isinstance(lower_order_final, bool):
        raise ValueError(f"unipc: lower_order_final must be True or False, got {lower_order_final!r}")
    if isinstance(disable_corrector, (str, bytes)) or not isinstance(disable_corrector, Iterable):
        raise ValueError(f"unipc: disable_corrector must be a collection of step indices, got {disable_corrector!r}")
    steps = list(disable_corrector)
    if not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in steps):
        raise ValueError(f"unipc: disable_corrector must hold step indices (integers >= 0), got {steps!r}")
    return set(steps)


@register("unipc")
def sample_unipc(
    denoise: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    order: int = 2,
    variant: str = "bh2",
    lower_order_final: bool = True,
    disable_corrector: Iterable[int] = (),
) -> Tensor:
    """UniPC-p (bh1 / bh2), data prediction, one network call per step; deterministic (``noise`` unused).

    ``order``: 1..3, reached after a warm-up of order - 1 lower-order steps. ``lower_order_final``: the last
    steps use at most as many points as steps remain (diffusers' rule: order 1 on the last step). A step to
    sigma = 0 is first order regardless. The last sigma may repeat the one before it (diffusers' Karras sigmas
    with final sigma_min): that zero-length step only evaluates the model to correct the step before it.
    ``disable_corrector``: indices i of steps whose result is not corrected
    (diffusers' option of the same name; UniC fixes step i's result when step i + 1 evaluates the model).
    The callback's ``x`` is the latent entering step i after correction; ``denoised`` is the evaluation at the
    predictor's (uncorrected) output, the value UniPC keeps.
    """
    no_corrector = _check_options(order, variant, lower_order_final, disable_corrector)
    s = prepare(x, sigmas)
    if any(b >= a for a, b in zip(s[:-1], s[1:-1])) or s[-1] > s[-2] or s[-1] == s[-2] == 0:
        raise ValueError(
            "unipc: sigmas must be strictly decreasing (the steps divide by log-sigma gaps), except that the last "
            f"may repeat the one before it if > 0 (Karras with final sigma_min); got {s}"
        )
    n = len(s) - 1
    ms: list[Tensor] = []  # x0 predictions, newest last, at most `order` kept
    lams: list[float] = []  # their lambdas = -log sigma
    x_prev, prev_order = x, 0
    for i in range(n):
        denoised = denoise(x, sigma_vec(x, s[i]))  # (B, C, H, W) at the predictor's output
        if i > 0 and (i - 1) not in no_corrector:  # UniC-p on step i - 1, with the order that step used
            x = _unipc_update(x_prev, s[i - 1], s[i], ms, lams, prev_order, variant, m_t=denoised)
        if callback is not None:
            callback(Step(i, x, s[i], s[i + 1], denoised))
        ms, lams = (ms + [denoised])[-order:], (lams + [_lam(s[i])])[-order:]
        this_order = min(order, n - i) if lower_order_final else order
        this_order = min(this_order, i + 1)  # warm-up: only i + 1 evaluations exist
        if s[i + 1] == 0:
            this_order = 1  # h = inf: the Taylor terms are meaningless, x = m0 (module docstring)
        x_prev, prev_order = x, this_order
        if s[i + 1] < s[i]:  # else the repeated last sigma: a zero-length step, only the correction above ran
            x = _unipc_update(x, s[i], s[i + 1], ms, lams, this_order, variant)
    return x
