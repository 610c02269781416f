"""PSNR of [-1, 1] images (peak-to-peak 2), accumulated over batches: ``PSNR = 10 log10(4 / MSE)``, the MSE over
every pixel of every image (the same definition as training/vae_task.psnr, which inference/ may not import)."""
from __future__ import annotations

import math

from torch import Tensor


class PSNR:
    def __init__(self):
        self.sum_sq, self.count = 0.0, 0

    def update(self, images: Tensor, reconstructions: Tensor) -> None:
        """Both (B, C, H, W) in [-1, 1]; the reconstructions are clamped to [-1, 1] first."""
        err = images.double() - reconstructions.double().clamp(-1, 1)
        self.sum_sq += float(err.square().sum())
        self.count += err.numel()

    def compute(self) -> float:
        if not self.count:
            raise ValueError("PSNR: no images")
        mse = self.sum_sq / self.count
        return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)
