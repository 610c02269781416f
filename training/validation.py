"""Validation images during training: the configured prompts sampled with fixed seeds, saved as one PNG grid.

    images = sample_validation(bundle, cfg.validation, size_hw=(32, 32), device=dev, dtype=torch.float32)
    save_grid(images, out / "validation" / "step-00000100.png", ncols=images_per_prompt)

The sampling loop is ``ldm.generate.sample_latents`` (the one inference uses); conditions are built as in
training (training/conditions.py), the unconditional branch from ``validation.negative_prompt``. Prompt p,
image k uses seed ``sampler.seed + k``, so the grid of step N and step M differ only by what was learned.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ldm.bundle import Bundle
from ldm.checkpoint import atomic_write
from ldm.generate import sample_latents

from .conditions import TextTowers, make_cond, tokenize
from .config import ValidationConfig

__all__ = ["sample_validation", "save_grid"]


@torch.no_grad()
def sample_validation(bundle: Bundle, vcfg: ValidationConfig, size_hw: tuple[int, int], *,
                      device: torch.device | str, dtype: torch.dtype) -> Tensor:  # fmt: skip
    """(P * K, 3, H, W) images in [0, 1] for P prompts and K = images_per_prompt, prompt-major."""
    cfg = bundle.config
    f = cfg.vae.downsample_factor
    h, w = size_hw
    if h % f or w % f:
        raise ValueError(f"validation.resolution: {h}x{w} is not a multiple of the VAE's factor {f}")
    towers = TextTowers(bundle.text)
    k = vcfg.images_per_prompt
    prompts = [p for p in vcfg.prompts for _ in range(k)]
    seeds = [vcfg.sampler.seed + i for _ in vcfg.prompts for i in range(k)]
    sdxl = cfg.family == "sdxl"
    sizes = torch.tensor([[h, w, 0, 0, h, w]] * len(prompts), dtype=torch.long)

    def cond_of(texts: list[str]):
        context, pooled = towers(tokenize(towers, texts, device))
        return make_cond(context.to(dtype), None if pooled is None else pooled.to(dtype), sizes, sdxl=sdxl)

    cond, uncond = cond_of(prompts), cond_of([vcfg.negative_prompt] * len(prompts))
    latents = sample_latents(bundle.denoiser(), cond, uncond, vcfg.sampler, seeds,
                             (cfg.vae.latent_channels, h // f, w // f), device=device, dtype=dtype)  # fmt: skip
    images = bundle.vae.decode(latents.to(next(bundle.vae.parameters()).dtype))  # (N, 3, H, W) in ~[-1, 1]
    return ((images.float() + 1) / 2).clamp(0, 1).cpu()


def save_grid(images: Tensor, path: str | os.PathLike, ncols: int) -> Path:
    """A (N, 3, H, W) [0, 1] batch as one PNG grid, ``ncols`` images per row; written atomically."""
    n, _, h, w = images.shape
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    grid = torch.zeros(3, nrows * h, ncols * w)
    for i in range(n):
        r, c = divmod(i, ncols)
        grid[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = images[i]
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    path = Path(path)
    atomic_write(path, lambda tmp: Image.fromarray(array, "RGB").save(tmp, format="PNG"))
    return path
