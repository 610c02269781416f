"""Euler-family samplers in sigma space (Karras et al. 2022, "EDM"; k-diffusion's sampling.py).

All work on the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (EDM eq. 3, ``to_d``):

    euler            first order, one network call per step
    euler_ancestral  Euler to sigma_down, then fresh noise of std sigma_up (``ancestral_step``); stochastic
    heun             EDM Algorithm 2 with S_churn = 0 (i.e. Algorithm 1): Euler predictor + trapezoidal corrector
    dpm2             k-diffusion's DPM-Solver-2: Euler to the geometric midpoint sigma_mid = sqrt(sigma sigma_next),
                     then the full step with the slope evaluated there (Lu et al. 2022, "DPM-Solver", r = 1/2)

A step that ends at sigma_next == 0 is a plain Euler step (x -> D(x; sigma)) in heun and dpm2: a second
evaluation at sigma = 0 would be undefined. These reproduce diffusers' EulerAncestralDiscreteScheduler,
HeunDiscreteScheduler and KDPM2DiscreteScheduler given the same sigmas (tests/test_parity_euler_heun_dpm2.py).
"""
from __future__ import annotations

import math

from torch import Tensor

from .common import (
    Callback, DenoiseFn, NoiseFn, Step, ancestral_step, check_nonnegative, prepare, randn_noise,
    register, sigma_vec, to_d,
)


@register("euler")
def sample_euler(
    denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, noise: NoiseFn | None = None, callback: Callback | None = None
) -> Tensor:
    """EDM Algorithm 2 without churn and without the Heun correction: first order, one call per step."""
    s = prepare(x, sigmas)
    for i in range(len(s) - 1):
        denoised = denoise(x, sigma_vec(x, s[i]))
        if callback is not None:
            callback(Step(i, x, s[i], s[i + 1], denoised))
        x = x + to_d(x, s[i], denoised) * (s[i + 1] - s[i])
    return x


@register("euler_ancestral", stochastic=True)
def sample_euler_ancestral(
    denoise: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Ancestral Euler (k-diffusion ``sample_euler_ancestral``; diffusers' EulerAncestralDiscreteScheduler).

    Each step goes deterministically to sigma_down and adds ``s_noise * sigma_up * noise(sigma, sigma_next)``,
    with sigma_down^2 + sigma_up^2 = sigma_next^2. ``eta`` scales sigma_up: 1 (the default, diffusers) is
    DDPM-like ancestral sampling, 0 is plain Euler. ``s_noise`` scales the added noise (1 = exact).
    """
    s = prepare(x, sigmas)
    eta = check_nonnegative("eta", eta)
    s_noise = check_nonnegative("s_noise", s_noise)
    noise = noise or randn_noise(x)
    for i in range(len(s) - 1):
        denoised = denoise(x, sigma_vec(x, s[i]))
        if callback is not None:
            callback(Step(i, x, s[i], s[i + 1], denoised))
        sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
        x = x + to_d(x, s[i], denoised) * (sigma_down - s[i])  # (B, C, H, W)
        if sigma_up > 0:
            x = x + noise(s[i], s[i + 1]).to(x) * (s_noise * sigma_up)
    return x


@register("heun")
def sample_heun(
    denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, noise: NoiseFn | None = None, callback: Callback | None = None
) -> Tensor:
    """Heun's 2nd order method, EDM Algorithm 2 with S_churn = 0 (diffusers' HeunDiscreteScheduler).

    Two network calls per step (one for the final step to sigma = 0); ``callback`` sees the first.
    """
    s = prepare(x, sigmas)
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = denoise(x, sigma_vec(x, sigma))
        if callback is not None:
            callback(Step(i, x, sigma, sigma_next, denoised))
        d = to_d(x, sigma, denoised)  # (B, C, H, W) dx/dsigma at sigma
        dt = sigma_next - sigma
        if sigma_next == 0:  # EDM Alg. 2 line 8: no correction at the last step
            x = x + d * dt
            continue
        x_pred = x + d * dt  # Euler predictor
        d_next = to_d(x_pred, sigma_next, denoise(x_pred, sigma_vec(x, sigma_next)))
        x = x + (d + d_next) / 2 * dt  # trapezoidal corrector (EDM Alg. 2 line 10)
    return x


@register("dpm2")
def sample_dpm2(
    denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, noise: NoiseFn | None = None, callback: Callback | None = None
) -> Tensor:
    """DPM-Solver-2 in sigma space (k-diffusion ``sample_dpm_2``; diffusers' KDPM2DiscreteScheduler).

    The midpoint is geometric, sigma_mid = exp((log sigma + log sigma_next) / 2), i.e. halfway in
    lambda = -log sigma (Lu et al. 2022, DPM-Solver-2 with r1 = 1/2), and the network is evaluated there.
    """
    s = prepare(x, sigmas)
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = denoise(x, sigma_vec(x, sigma))
        if callback is not None:
            callback(Step(i, x, sigma, sigma_next, denoised))
        d = to_d(x, sigma, denoised)  # (B, C, H, W)
        if sigma_next == 0:  # Euler to sigma = 0: the midpoint would be 0 as well
            x = x + d * (sigma_next - sigma)
            continue
        sigma_mid = math.exp(0.5 * (math.log(sigma) + math.log(sigma_next)))
        x_mid = x + d * (sigma_mid - sigma)
        d_mid = to_d(x_mid, sigma_mid, denoise(x_mid, sigma_vec(x, sigma_mid)))
        x = x + d_mid * (sigma_next - sigma)
    return x
