"""Latents from conditions: the sampling loop that inference pipelines and training validation share.

    latents = sample_latents(denoiser, cond, uncond, SamplerConfig(name="dpmpp_2m", steps=25), seeds, (4, 64, 64))

Each latent comes from its own seed: the starting noise and every stochastic step draw from a CPU generator per
image (ldm.samplers.per_sample_noise), so latent k depends only on seed k and its conditions, never on the batch.
The start is the exact VP prior at sigma_max, ``noise * sqrt(1 + sigma_max^2)`` (diffusers' VP schedulers start
from unit noise in the VP view, which is the same point).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .conditioning import Cond
from .denoiser import Denoiser
from .guidance import cfg as guided
from .samplers import Callback, get_sampler, per_sample_noise, randn_per_sample
from .samplers.config import SamplerConfig, make_sigmas, sampler_options


def generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image (device independent), seeded as given."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def sample_latents(
    denoiser: Denoiser,
    cond: Cond | None,
    uncond: Cond | None,
    sampler: SamplerConfig,
    seeds: Sequence[int],
    shape: Sequence[int],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    callback: Callback | None = None,
    latents: Tensor | None = None,
) -> Tensor:
    """(B, *shape) final latents for B = len(seeds) images with CFG scale ``sampler.cfg_scale``.

    ``latents`` optionally replaces the seeded starting noise (unit variance, as diffusers' ``latents=``).
    """
    if len(seeds) == 0:
        raise ValueError("sample_latents: seeds is empty; give one seed per image")
    gens = generators(seeds)
    noise = latents if latents is not None else randn_per_sample(gens, tuple(shape), device, dtype)
    if noise.shape[0] != len(seeds):
        raise ValueError(f"sample_latents: {noise.shape[0]} starting latents for {len(seeds)} seeds")
    sigmas = make_sigmas(denoiser.schedule, sampler)
    x = noise.to(device, dtype) * float((1 + sigmas[0] ** 2) ** 0.5)
    denoise = guided(denoiser, cond, uncond, sampler.cfg_scale, sampler.guidance_rescale)
    with torch.no_grad():
        return get_sampler(sampler.name)(
            denoise, x, sigmas, noise=per_sample_noise(gens, x), callback=callback, **sampler_options(sampler)
        )
