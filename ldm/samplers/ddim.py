"""DDIM (Song et al. 2021) and DDPM ancestral sampling (Ho et al. 2020), written over sigmas only.

A discrete VP model has ``a = alphas_cumprod[t] = 1 / (1 + sigma^2)``, so every coefficient of these
samplers is a function of (sigma, sigma_next) = (s, s'). With ``x = x_vp / sqrt(a)`` (the VE view,
ldm/schedule.py), ``D = denoise(x, s)`` and ``eps = (x - D) / s``:

DDIM, Song et al. 2021 eq. 12 with the variance of eq. 16 (eta * the DDPM posterior std):
    x'_vp = sqrt(a') D + sqrt(1 - a' - std^2) eps + std z,   std^2 = eta^2 (1 - a') / (1 - a) (1 - a / a')
  Multiplying by sqrt(1 + s'^2) = 1 / sqrt(a') and using 1 - a = s^2 / (1 + s^2):
    std^2 (1 + s'^2) = eta^2 s'^2 (s^2 - s'^2) / s^2 =: sigma_up^2,   (1 - a')(1 + s'^2) = s'^2
    x' = D + sigma_down eps + sigma_up z,   sigma_down = sqrt(s'^2 - sigma_up^2)
  which is exactly k-diffusion's ancestral split (common.ancestral_step). With eta = 0 it is x' = D + s' eps,
  i.e. one Euler step of the probability-flow ODE (Karras et al. 2022, sec. 4).

DDPM, Ho et al. 2020 eq. 6-7, the posterior q(x_{t'} | x_t, x0) with diffusers' 'fixed_small' variance,
where strided steps use beta_t = 1 - a / a':
    mean = sqrt(a') beta_t / (1 - a) x0 + sqrt(a / a') (1 - a') / (1 - a) x_vp,   var = (1 - a') / (1 - a) beta_t
  In the VE view: var (1 + s'^2) = s'^2 (s^2 - s'^2) / s^2 and mean / sqrt(a') = D + (s'/s)^2 (x - D), i.e.
    x' = D + (s'^2 / s) eps + (s'/s) sqrt(s^2 - s'^2) z
  which is DDIM with eta = 1 (Song et al. 2021, sec. 4.1: eta = 1 recovers the DDPM posterior).

Where diffusers' final step lands on alphas_cumprod[0] (``set_alpha_to_one=False``) the caller ends the sigmas
at schedule.sigma_min; a final sigma of 0 lands exactly on the last x0 prediction.
"""
from __future__ import annotations


from torch import Tensor

from .common import (
    Callback, DenoiseFn, NoiseFn, Step, ancestral_step, check_nonnegative, check_positive_before_last, prepare, randn_noise,
    register, sigma_vec, to_d,
)


def ddim_step(x: Tensor, denoised: Tensor, sigma: float, sigma_next: float, eta: float, noise: NoiseFn | None) -> Tensor:
    """One DDIM step (module docstring): x' = D + sigma_down * eps + sigma_up * z; x, denoised (B, C, H, W).

    sigma_up is capped at sigma_next (ancestral_step), which only matters for eta > 1.
    """
    sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
    x_next = denoised + to_d(x, sigma, denoised) * sigma_down  # (B, C, H, W); exactly D when sigma_next = 0
    if sigma_up > 0:
        x_next = x_next + noise(sigma, sigma_next).to(x_next) * sigma_up
    return x_next


@register("ddim", stochastic=True)
def sample_ddim(
    denoise: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM (Song et al. 2021): deterministic for eta = 0 (then an Euler step), fresh noise for eta > 0."""
    s = prepare(x, sigmas)
    check_positive_before_last(s)
    check_nonnegative("eta", eta)  # 0 = deterministic DDIM, 1 = the DDPM posterior noise
    noise = noise if noise is not None else randn_noise(x)
    for i in range(len(s) - 1):
        denoised = denoise(x, sigma_vec(x, s[i]))  # (B, C, H, W)
        if callback is not None:
            callback(Step(i, x, s[i], s[i + 1], denoised))
        x = ddim_step(x, denoised, s[i], s[i + 1], eta, noise)
    return x


@register("ddpm", stochastic=True)
def sample_ddpm(
    denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, noise: NoiseFn | None = None, callback: Callback | None = None
) -> Tensor:
    """Ancestral sampling from the DDPM posterior (Ho et al. 2020, 'fixed_small' variance) = DDIM with eta = 1."""
    return sample_ddim(denoise, x, sigmas, noise=noise, callback=callback, eta=1.0)
