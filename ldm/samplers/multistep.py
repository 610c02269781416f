"""Linear multistep samplers over sigmas: PLMS (Liu et al. 2022, "PNDM") and LMS (k-diffusion / diffusers).

Both reuse past model evaluations instead of extra ones; both are deterministic (``noise`` is ignored).

PLMS = PNDM with skip_prk_steps=True, as diffusers' ``PNDMScheduler.step_plms`` does it (after crowsonkb's
PLMS in CompVis/latent-diffusion#51). PNDM's transfer (Liu et al. 2022, eq. 9) with eps is the DDIM eta = 0
step, which in the VE view (ldm/samplers/ddim.py) is ``x' = x + (s' - s) eps``. PLMS feeds it the
Adams-Bashforth extrapolation of the last network outputs q_k (eq. 12, with 4th order at most):
    order 1: q0                          order 2: (3 q0 - q1) / 2
    order 3: (23 q0 - 16 q1 + 5 q2) / 12  order 4: (55 q0 - 59 q1 + 37 q2 - 9 q3) / 24     (q0 newest)
Warm-up: the first step is a Heun step (evaluate at the Euler prediction x1' at s1, average the two outputs,
redo the step from x0); this is diffusers' duplicated second timestep. The Euler-predictor output is then
dropped, so step 2 is 2nd order over (q(x1, s1), q(x0, s0)). A single-step schedule is one Euler step.
diffusers combines the raw network outputs: eps for eps models, but v for v models. ``extrapolate`` picks
the quantity (converted from and back to the denoiser's x0 with ldm/denoiser.py), 'eps' by default; pass
the model's own prediction to reproduce diffusers exactly.

LMS: x' = x + sum_j c_j d_{i-j} with d = (x - D) / s (EDM eq. 3) and c_j the integral over [s_i, s_{i+1}]
of the Lagrange basis polynomial through the last ``order`` sigmas that is 1 at s_{i-j}
(the Adams-Bashforth construction on the non-uniform sigma grid; diffusers' LMSDiscreteScheduler integrates
it numerically with scipy, we integrate the polynomial exactly).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..denoiser import PREDICTIONS, scalings, training_target
from .common import Callback, DenoiseFn, NoiseFn, Step, prepare, register, sigma_vec, to_d
from .common import check_positive_before_last

# Adams-Bashforth numerators (newest first) and denominator, by order (Liu et al. 2022, eq. 12)
ADAMS_BASHFORTH = {1: ((1,), 1), 2: ((3, -1), 2), 3: ((23, -16, 5), 12), 4: ((55, -59, 37, -9), 24)}


# ---------------------------------------------------------------------------------------------- PLMS


def _to_pred(x: Tensor, sigma: float, denoised: Tensor, prediction: str) -> Tensor:
    """The network-output view (eps / v / x0) of a denoiser result at (x, sigma); all (B, C, H, W)."""
    eps = to_d(x, sigma, denoised)
    if prediction == "eps":
        return eps
    return training_target(prediction, denoised, eps, sigma_vec(x, sigma))


def _eps_from_pred(x: Tensor, sigma: float, q: Tensor, prediction: str) -> Tensor:
    """eps at (x, sigma) for an output q in the view ``prediction``: x0 = c_skip x + c_out q (denoiser.py)."""
    if prediction == "eps":
        return q
    c_skip, c_out, _ = scalings(torch.tensor(sigma, dtype=torch.float64), prediction)
    return to_d(x, sigma, c_skip * x + c_out * q)


@register("plms")
def sample_plms(
    denoise: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    extrapolate: str = "eps",
) -> Tensor:
    """PLMS (PNDM with skip_prk_steps, Liu et al. 2022): 4th-order Adams-Bashforth on eps after a Heun warm-up."""
    s = prepare(x, sigmas)
    check_positive_before_last(s)
    if extrapolate not in PREDICTIONS:
        raise ValueError(f"extrapolate: unknown value {extrapolate!r}; allowed: {', '.join(PREDICTIONS)}")
    n = len(s) - 1
    outs: list[Tensor] = []  # past outputs q, oldest first, at most 4; each (B, C, H, W)
    for i in range(n):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = denoise(x, sigma_vec(x, sigma))
        if callback is not None:
            callback(Step(i, x, sigma, sigma_next, denoised))
        q = _to_pred(x, sigma, denoised, extrapolate)
        outs = (outs + [q])[-4:]
        if i == 0 and n > 1:  # Heun warm-up: predictor x1' at sigma_next, then the averaged output from x
            x_pred = x + (sigma_next - sigma) * _eps_from_pred(x, sigma, q, extrapolate)
            q_pred = _to_pred(x_pred, sigma_next, denoise(x_pred, sigma_vec(x, sigma_next)), extrapolate)
            q_step = (q + q_pred) / 2
        else:
            coeffs, denom = ADAMS_BASHFORTH[len(outs)]
            q_step = sum(c * o for c, o in zip(coeffs, reversed(outs))) / denom
        x = x + (sigma_next - sigma) * _eps_from_pred(x, sigma, q_step, extrapolate)
    return x


# ----------------------------------------------------------------------------------------------- LMS


def lagrange_integral(nodes: list[float], j: int, a: float, b: float) -> float:
    """Exact integral over [a, b] of the Lagrange basis polynomial through ``nodes`` that is 1 at nodes[j].

    The polynomial is expanded in u = tau - a (small near the step, so little cancellation) and integrated
    term by term: int_0^h u^m du = h^(m+1) / (m+1).
    """
    d = [v - a for v in nodes]
    poly = [1.0]  # coefficients in u, lowest degree first
    for k, dk in enumerate(d):
        if k == j:
            continue
        denom = d[j] - dk
        # poly * (u - dk) / denom
        poly = [((poly[m - 1] if m > 0 else 0.0) - dk * (poly[m] if m < len(poly) else 0.0)) / denom for m in range(len(poly) + 1)]
    h = b - a
    return sum(c * h ** (m + 1) / (m + 1) for m, c in enumerate(poly))


@register("lms")
def sample_lms(
    denoise: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    order: int = 4,
) -> Tensor:
    """Linear multistep on the ODE derivative over sigma, ``order`` past derivatives (4 as diffusers / k-diffusion)."""
    s = prepare(x, sigmas)
    check_positive_before_last(s)
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be an integer >= 1, got {order!r}")
    if any(b >= a for a, b in zip(s, s[1:])):
        raise ValueError(f"sigmas must be strictly decreasing for LMS (the Lagrange nodes must differ), got {s}")
    ds: list[Tensor] = []  # past derivatives, oldest first, at most `order`; each (B, C, H, W)
    for i in range(len(s) - 1):
        denoised = denoise(x, sigma_vec(x, s[i]))
        if callback is not None:
            callback(Step(i, x, s[i], s[i + 1], denoised))
        ds = (ds + [to_d(x, s[i], denoised)])[-order:]
        nodes = [s[i - j] for j in range(len(ds))]  # s_i, s_{i-1}, ... (newest first)
        coeffs = [lagrange_integral(nodes, j, s[i], s[i + 1]) for j in range(len(ds))]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x
