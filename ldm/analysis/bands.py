"""Coarse to fine: the energy of the x0 prediction in low and high spatial-frequency bands, step by step.

"Outline first, details later" (Wang & Vastola 2023, sec. 3; Rissanen et al. 2023; Dieleman 2024, "diffusion is
spectral autoregression"): the low frequencies of the predicted image settle early in the reverse process, the
high ones late. For images (..., H, W) with 2-D DFT F(u, v) (torch.fft.fft2) and radial frequency
``f = sqrt(fu^2 + fv^2)`` in cycles per pixel (``torch.fft.fftfreq``, |f| <= sqrt(2) / 2):

    E_low  = sum_{f <= cutoff} |F|^2 / (H W)        E_high = sum_{f > cutoff} |F|^2 / (H W)

summed over channels, per image. By Parseval, E_low + E_high = sum x^2 (the image's energy). The default cutoff,
1/4 cycle per pixel, is half the Nyquist frequency of each axis; the mean (DC) belongs to the low band.

``settle_step(seq, tol)``: the first index k after which the sequence stays within ``tol`` (relative) of its
final value: |E_j - E_final| <= tol |E_final| for every j >= k.
"""
from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_CUTOFF = 0.25  # cycles per pixel
DEFAULT_TOL = 0.05


def band_masks(h: int, w: int, cutoff: float = DEFAULT_CUTOFF) -> tuple[Tensor, Tensor]:
    """(low, high) boolean (H, W) masks over torch.fft.fft2's frequency grid."""
    fu = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
    fv = torch.fft.fftfreq(w, dtype=torch.float64)[None, :]
    low = (fu**2 + fv**2).sqrt() <= cutoff + 1e-12
    return low, ~low


def band_energy(images: Tensor, cutoff: float = DEFAULT_CUTOFF) -> tuple[Tensor, Tensor]:
    """images (..., C, H, W) -> (E_low, E_high), each (...): energy per image in each band (channels summed)."""
    if images.ndim < 3:
        raise ValueError(f"band_energy: need (..., C, H, W) images, got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    power = torch.fft.fft2(images.double()).abs() ** 2 / (h * w)  # (..., C, H, W)
    low, high = band_masks(h, w, cutoff)
    return (power * low).sum((-3, -2, -1)), (power * high).sum((-3, -2, -1))


def settle_step(seq: Tensor, tol: float = DEFAULT_TOL) -> Tensor:
    """seq (T, ...) -> (...) int64: first k with |seq[j] - seq[-1]| <= tol |seq[-1]| for all j >= k."""
    final = seq[-1]
    off = (seq - final).abs() > tol * final.abs()  # (T, ...)
    t = seq.shape[0]
    idx = torch.arange(t).reshape(-1, *([1] * (seq.ndim - 1))).expand_as(seq)
    last_off = torch.where(off, idx, torch.full_like(idx, -1)).amax(0)  # the last index still off
    return last_off + 1
