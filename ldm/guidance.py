"""Classifier-free guidance as a wrapper around the denoiser (Ho & Salimans 2022).

``guide`` turns a Denoiser and a list of conditions into a ``denoise(x, sigma) -> x0`` for the samplers.
All conditions are evaluated in ONE batched network call per step. With conditions c_0 (the unconditional,
e.g. the negative prompt), c_1 .. c_K and scales w_1 .. w_K:

    chain=True   D = D(c_0) + sum_k w_k (D(c_k) - D(c_{k-1}))   InstructPix2Pix (Brooks et al. 2023, eq. 3)
    chain=False  D = D(c_0) + sum_k w_k (D(c_k) - D(c_0))       composable guidance (Liu et al. 2022)

K = 1 is ordinary CFG. Guidance is linear, so combining x0 predictions equals combining eps predictions.
Guidance rescale (Lin et al. 2023, sec. 3.4, eq. 15-16) is non-linear; it is applied to the eps predictions,
as in diffusers' ``rescale_noise_cfg``: eps = phi * eps_cfg * std(eps_K) / std(eps_cfg) + (1 - phi) * eps_cfg.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .conditioning import Cond
from .samplers.common import DenoiseFn


def _bcast(sigma: Tensor, x: Tensor) -> Tensor:
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def rescale_guidance(eps_cfg: Tensor, eps_cond: Tensor, phi: float) -> Tensor:
    """Lin et al. 2023, eq. 15-16: match the per-sample std of the guided prediction to the conditional one."""
    dims = tuple(range(1, eps_cfg.ndim))
    std_cond = eps_cond.std(dim=dims, keepdim=True)
    std_cfg = eps_cfg.std(dim=dims, keepdim=True)
    return phi * (eps_cfg * (std_cond / std_cfg)) + (1 - phi) * eps_cfg


def guide(
    denoiser,
    conds: Sequence[Cond | None],
    scales: Sequence[float],
    *,
    chain: bool = True,
    rescale: float = 0.0,
) -> DenoiseFn:
    """denoise(x, sigma) for conditions ``conds = [c_0, c_1, .., c_K]`` and ``scales = [w_1, .., w_K]``."""
    conds, scales = list(conds), [float(w) for w in scales]
    if len(conds) < 1 or len(scales) != len(conds) - 1:
        raise ValueError(f"guide: need K+1 conditions for K scales, got {len(conds)} conditions, {len(scales)} scales")
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
    if all(c is None for c in conds) and len(conds) > 1:
        raise ValueError("guide: all conditions are None; nothing to guide")

    # Coefficients a_k with D = sum_k a_k D(c_k): drop the conditions whose coefficient is exactly 0, so that
    # scale 1 is exactly the conditional denoiser and scale 0 exactly the unconditional one, at no extra cost.
    coef = [0.0] * len(conds)
    coef[0] = 1.0
    for k, w in enumerate(scales, start=1):
        coef[k] += w
        coef[k - 1 if chain else 0] -= w
    used = [k for k, a in enumerate(coef) if a != 0.0]
    if not used:
        raise ValueError(f"guide: scales {scales} cancel every condition")
    last = len(conds) - 1  # the fully conditioned prediction, the reference for rescale
    need = sorted(set(used) | ({last} if rescale > 0 else set()))
    batched = Cond.cat([conds[k] for k in need]) if conds[need[0]] is not None else None
    # The batch is one latent under n conditions; a U-Net told so (context alone, n B rows; UNet.forward) runs the
    # layers before its first cross-attention once instead of on n copies of x.
    shared = (len(need) > 1 and batched is not None and getattr(denoiser, "shares_latent", False)
              and all(getattr(batched, f) is None for f in ("vector", "concat", "control", "extra")))  # fmt: skip

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        # x: (B, C, H, W); sigma: (B,)
        n = len(need)
        if n == 1:
            return denoiser(x, sigma, conds[need[0]])
        if shared:
            outs = denoiser(x, sigma, batched).chunk(n)  # n x (B, C, H, W)
        else:
            outs = denoiser(torch.cat([x] * n), torch.cat([sigma] * n), batched).chunk(n)
        by_k = dict(zip(need, outs))
        x0 = sum(coef[k] * by_k[k] for k in used)
        if rescale > 0:
            s = _bcast(sigma.to(x.dtype), x)
            eps_cfg, eps_cond = (x - x0) / s, (x - by_k[last]) / s
            x0 = x - s * rescale_guidance(eps_cfg, eps_cond, rescale)
        return x0

    return denoise


def cfg(denoiser, cond: Cond | None, uncond: Cond | None, scale: float, rescale: float = 0.0) -> DenoiseFn:
    """Ordinary classifier-free guidance: D(uncond) + scale (D(cond) - D(uncond)); uncond may be a negative prompt."""
    return guide(denoiser, [uncond, cond], [scale], rescale=rescale)
