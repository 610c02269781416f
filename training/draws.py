"""Per-sample random draws made where the row is read: in the DataLoader workers, not in the training step.

Each sample's randomness depends only on (seed, epoch, dataset index) (training/conditions.py ``keyed_seed``), so
resuming is exact and N processes with batch b take the same steps as one with batch N * b. Drawing it sample by
sample in the training loop costs a few CPU generators per sample, every step (tens of ms at a batch of 1,024,
more than a small model's whole GPU step); here the workers draw it beside the image decoding, in parallel.

Per row, two generators, each drawing in the order the losses consume the numbers:

    "vae"   eps          (z, h, w)  the posterior sample z = mean + exp(logvar / 2) * eps  (autoencoder/vae.py)
    "loss"  t            ()         the training timestep, uniform in [0, T)                 (ldm/loss.py
            noise        (z, h, w)  the diffusion noise                                       DiffusionLoss.draw,
            offset       (z, 1, 1)  noise offset                                              a list of generators:
            perturbation (z, h, w)  input perturbation                                        the same numbers)

(z, h, w) is the latent shape of the row: from cached moments (2z, h, w), or from the image (3, H, W) and the VAE's
downsampling factor f. task=vae draws only "vae".
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ldm.loss import NoiseDraw

from .conditions import keyed_seed

__all__ = ["DRAW_KEYS", "KeyedDraws", "noise_draw"]

DRAW_KEYS = ("_eps", "_t", "_noise", "_offset", "_perturbation")


class KeyedDraws(Dataset):
    """Rows of ``rows`` with their draws added under DRAW_KEYS (collated to (B, ...) tensors)."""

    def __init__(self, rows, seed: int, *, latent_channels: int, factor: int, cached: bool,
                 num_train_timesteps: int | None):  # fmt: skip
        self.rows, self.seed, self.epoch = rows, seed, 0
        self.z, self.f, self.cached, self.T = latent_channels, factor, cached, num_train_timesteps

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.rows.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def batch_sampler(self, batch_size: int, *, num_replicas: int, rank: int):
        return self.rows.batch_sampler(batch_size, num_replicas=num_replicas, rank=rank)

    def latent_shape(self, pixel_shape) -> tuple[int, int, int]:
        c, h, w = pixel_shape
        return (c // 2, h, w) if self.cached else (self.z, h // self.f, w // self.f)

    def __getitem__(self, index: int) -> dict[str, Any] | Any:
        row = self.rows[index]
        if not isinstance(row, dict):
            return row
        return {**row, **self.draws(index, self.latent_shape(row["pixel_values"].shape))}

    def draws(self, index: int, shape: tuple[int, int, int]) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(keyed_seed(self.seed, self.epoch, index, "vae"))
        out = {"_eps": torch.randn(shape, generator=g)}  # (z, h, w)
        if self.T is not None:
            g = torch.Generator().manual_seed(keyed_seed(self.seed, self.epoch, index, "loss"))
            out["_t"] = int(torch.randint(0, self.T, (1,), generator=g))
            out["_noise"] = torch.randn(shape, generator=g)  # (z, h, w)
            out["_offset"] = torch.randn((shape[0], 1, 1), generator=g)  # (z, 1, 1)
            out["_perturbation"] = torch.randn(shape, generator=g)  # (z, h, w)
        return out


def noise_draw(batch: dict, device) -> NoiseDraw:
    """The DiffusionLoss draws of a collated batch, on ``device``."""
    return NoiseDraw(*(batch[k].to(device) for k in ("_t", "_noise", "_offset", "_perturbation")))
