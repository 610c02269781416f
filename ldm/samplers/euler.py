"""Euler-family samplers in sigma space (Karras et al. 2022, "EDM"; k-diffusion's sampling.py)."""
from __future__ import annotations

import torch
from torch import Tensor

from .common import Callback, DenoiseFn, NoiseFn, Step, prepare, register, sigma_vec, to_d


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
