"""Training the KL autoencoder with the trainer (``task: vae``): the step module, validation, the latent scale.

No pretrained VAE can be downloaded on the machines this project is built on, so a model trained from scratch
starts here: ``ldm train CONFIG task=vae`` trains ``bundle.vae`` with autoencoder/loss.py's objective
(reconstruction + KL + an optional PatchGAN term) and every feature of the U-Net loop (accumulation, clipping,
mixed precision, EMA, NaN skipping, checkpoints, exact resume, DDP). Then a U-Net run takes that VAE with
``model.vae=RUN/model-ema``.

One optimizer step, one backward: the VAE step and the discriminator step of the original (two optimizers, two
backward passes) are summed into one loss, since their parameters are disjoint and their gradients separate:

    loss = [rec + kl_weight * KL + d_weight * disc_factor * g_loss]  (gradients reach the VAE only: the
           discriminator runs with detached parameters, autoencoder/loss.py)
         + [disc_factor * D_loss(D(x), D(x_rec.detach()))]           (gradients reach the discriminator only)

One AdamW holds both parameter sets (``vae.*`` and ``disc.*`` in the checkpoints; ``ldm export`` drops ``disc.``).

The latent scale (``scale_factor``): the U-Net is trained on ``scale_factor * z`` and expects unit variance, as
SD's 0.18215 = 1 / std(z) measured on its VAE's latents (Rombach et al. 2022, appendix G). With
``vae_fit_scale`` the trainer measures 1 / std of posterior samples of up to ``VAE_SCALE_IMAGES`` training images
at the end and writes it into the saved model's config.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from autoencoder.loss import VAELoss
from autoencoder.vae import sample_posterior

from .collate import collate_rows

__all__ = ["VAETrainStep", "fixed_images", "fit_scale_factor", "psnr", "reconstruct_grid"]

VAE_SCALE_IMAGES = 1024  # images whose posterior samples give the latent std


class VAETrainStep(nn.Module):
    """The autoencoder and its loss as one module whose forward is the whole objective, so DDP (which hooks the
    wrapped module's forward) all-reduces the gradients of both the VAE and the discriminator."""

    def __init__(self, vae: nn.Module, criterion: VAELoss):
        super().__init__()
        self.vae, self.criterion = vae, criterion

    def forward(self, images: Tensor, step: int, generator=None, eps: Tensor | None = None) -> tuple[Tensor, dict]:
        """images (B, 3, H, W) in [-1, 1] -> (loss, detached () logs); the posterior sample from ``generator`` or
        its standard-normal numbers ``eps`` (B, z, h, w)."""
        loss, logs = self.criterion.generator_loss(self.vae, images, step, generator, eps)
        d_loss, d_logs = self.criterion.discriminator_loss(logs.pop("reconstructions"), images, step)
        return loss + d_loss, {**logs, **d_logs}


def fixed_images(rows, n: int) -> Tensor:
    """(k, 3, H, W) the first ``n`` readable images of ``rows`` (evaluation transform), k <= n."""
    found: list[dict] = []
    for index in range(len(rows)):
        if len(found) >= n:
            break
        row = rows[index]
        if isinstance(row, dict):
            found.append(row)
    if not found:
        raise ValueError("validation: no readable image in the dataset to reconstruct")
    return collate_rows(found)["pixel_values"]


def psnr(images: Tensor, reconstructions: Tensor) -> float:
    """Peak signal-to-noise ratio in dB of [-1, 1] images (peak-to-peak 2), over the whole batch."""
    mse = (images.float() - reconstructions.float().clamp(-1, 1)).square().mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


@torch.no_grad()
def reconstruct_grid(vae, images: Tensor, device, dtype) -> tuple[Tensor, float]:
    """(2k, 3, H, W) in [0, 1]: the images and, below them, their reconstructions from the posterior mean; PSNR."""
    x = images.to(device, dtype)
    mean, _ = vae.moments(x)
    rec = vae._decode_z(mean).float().cpu()  # (k, 3, H, W)
    both = torch.cat([images.float(), rec.clamp(-1, 1)])
    return (both + 1) / 2, psnr(images, rec)


@torch.no_grad()
def fit_scale_factor(vae, rows, batch_size: int, device, dtype, max_images: int = VAE_SCALE_IMAGES) -> float:
    """1 / std of posterior samples z ~ q(z|x) of up to ``max_images`` images (all channels and positions)."""
    gen = torch.Generator(device).manual_seed(0)
    total, sq, count, taken = 0.0, 0.0, 0, 0
    index = 0
    while taken < max_images and index < len(rows):
        batch = [r for r in (rows[i] for i in range(index, min(index + batch_size, len(rows)))) if isinstance(r, dict)]
        index += batch_size
        if not batch:
            continue
        mean, logvar = vae.moments(collate_rows(batch)["pixel_values"].to(device, dtype))  # (B, z, h, w)
        z = sample_posterior(mean.float(), logvar.float(), gen).double()
        total, sq, count, taken = total + z.sum().item(), sq + z.square().sum().item(), count + z.numel(), taken + len(batch)
    if count < 2:
        raise ValueError("vae_fit_scale: no readable image to measure the latent scale on")
    var = (sq - total * total / count) / (count - 1)
    return 1.0 / math.sqrt(var)
