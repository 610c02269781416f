"""Starting part-way through the reverse process (img2img) and keeping a known region (inpainting by mask).

img2img (Meng et al. 2022, "SDEdit"): noise the clean latent z0 to the sigma where sampling starts and run
only the last ``strength`` fraction of the schedule. Which steps survive follows diffusers'
``get_timesteps``: ``init = min(int(steps * strength), steps)`` steps are kept, counted from the end.

Inpainting by mask blending (works with any model and any sampler): before every network call the known
region of x is replaced by the forward process at that sigma, ``z0 + sigma * noise`` (the same noise that
started the trajectory), and after the last step by z0 itself. This is diffusers' legacy inpainting
(blending after each step) written as a wrapper around the denoiser instead of inside every sampler.
``mask`` is 1 where the image is generated and 0 where it is kept.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .samplers.common import DenoiseFn
from .schedule import check_sigmas


def strength_sigmas(sigmas: Tensor, strength: float) -> Tensor:
    """The tail of an (N + 1,) schedule that img2img runs for ``strength`` in [0, 1]."""
    if not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
    check_sigmas(sigmas)
    steps = len(sigmas) - 1
    keep = min(int(steps * strength), steps)
    if keep == 0:
        raise ValueError(
            f"strength={strength} with steps={steps} rounds to zero denoising steps; "
            f"raise strength or steps so that int(steps * strength) >= 1"
        )
    return sigmas[steps - keep :]


def noised(z0: Tensor, noise: Tensor, sigma: float) -> Tensor:
    """The forward process in the VE view: z0 + sigma * noise."""
    return z0 + sigma * noise


def _check_mask(z0: Tensor, mask: Tensor) -> None:
    if mask.ndim != z0.ndim or mask.shape[-2:] != z0.shape[-2:] or mask.shape[0] not in (1, z0.shape[0]):
        raise ValueError(
            f"mask must have shape (B or 1, 1 or C, H, W) matching the latent {tuple(z0.shape)}, got {tuple(mask.shape)}"
        )


def inpaint_denoiser(denoise: DenoiseFn, z0: Tensor, mask: Tensor, noise: Tensor) -> DenoiseFn:
    """Wrap ``denoise`` so the known region (mask == 0) of its input follows z0's forward process.

    z0, noise: (B, C, H, W) latents; mask: (B or 1, 1 or C, H, W) in [0, 1].
    """
    _check_mask(z0, mask)
    if noise.shape != z0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from the latent's {tuple(z0.shape)}")
    mask = mask.to(z0.dtype)

    def wrapped(x: Tensor, sigma: Tensor) -> Tensor:
        s = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        x = mask * x + (1 - mask) * (z0 + s * noise)
        return mask * denoise(x, sigma) + (1 - mask) * z0

    return wrapped


def blend_known(x: Tensor, z0: Tensor, mask: Tensor) -> Tensor:
    """After the last step: the known region is exactly z0."""
    _check_mask(z0, mask)
    mask = mask.to(x.dtype)
    return mask * x + (1 - mask) * z0
