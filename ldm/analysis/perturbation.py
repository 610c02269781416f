"""Perturbation sensitivity: how much the final image changes when x_t is nudged at step k.

Wang & Vastola 2023 (sec. 3): perturbations early in the reverse process change the result far more than late
ones. For each step k we take the state x_k the sampler reached (an unperturbed run), add a perturbation delta of
fixed norm, and finish with the same sampler from step k, once from x_k (the reference) and once from
x_k + delta (both restarted at k, so multistep samplers' restart does not count as change). Reported per k,
averaged over the batch:

    relative_change = |final(x_k + delta) - final(x_k)| / |final(x_k)|
    gain            = |final(x_k + delta) - final(x_k)| / |delta|

"Fixed norm" is measured in the network's (VP) scale by default (``vp=True``): |delta| = radius sqrt(1 + sigma_k^2)
in the VE view, i.e. a fixed fraction of the VP state y = x / sqrt(1 + sigma^2), whose norm stays about the same
along the trajectory (a fixed VE norm would vanish against |x| ~ sigma sqrt(D) early on). ``vp=False``: |delta| =
radius in the VE view.

For Gaussian data and the ideal denoiser the flow is affine, so the change is exactly A_k delta with
A_k = sqrt((Sigma + s_end^2) / (Sigma + sigma_k^2)) (ldm/analysis/gaussian.py, GaussianFit.ode_gain).
Deterministic samplers only, unless ``noise_factory()`` gives each run the same noise function.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from ..samplers.common import Sampler


def unit_directions(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """(B, ...) random directions of norm 1 per sample (Gaussian, normalised)."""
    d = torch.randn(like.shape, generator=generator, dtype=torch.float32).to(like)
    return d / d.reshape(d.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (d.ndim - 1)))


def perturbation_sensitivity(sampler: Sampler, denoise, states: Tensor, sigmas: Tensor, ks: Sequence[int],
                             radius: float, directions: Tensor | None = None,
                             generator: torch.Generator | None = None,
                             noise_factory: Callable | None = None, vp: bool = True, **options) -> dict:  # fmt: skip
    """states (S + 1, B, ...): the unperturbed run's x entering each step (``Trajectory.xs``); ks: steps to perturb
    (0 <= k < S). ``directions`` (B, ...) unit-norm (default: random per k, from ``generator``).

    Returns {"k", "sigma", "relative_change", "gain"} (lists over ks, batch means) and per-sample (len(ks), B)
    tensors under "relative_change_all", "gain_all"."""
    steps = len(sigmas) - 1
    rel, gain = [], []
    for k in ks:
        if not 0 <= k < steps:
            raise ValueError(f"perturbation_sensitivity: k must be in [0, {steps}), got {k}")
        x_k = states[k]
        u = directions if directions is not None else unit_directions(x_k, generator)
        norm = radius * (1 + float(sigmas[k]) ** 2) ** 0.5 if vp else radius
        delta = (u * norm).to(x_k)
        kw = dict(options)
        runs = []
        for start in (x_k, x_k + delta):
            if noise_factory is not None:
                kw["noise"] = noise_factory()
            runs.append(sampler(denoise, start, sigmas[k:], **kw).double())
        ref, pert = runs
        diff = (pert - ref).reshape(ref.shape[0], -1).norm(dim=1)
        rel.append(diff / ref.reshape(ref.shape[0], -1).norm(dim=1).clamp(min=1e-300))
        gain.append(diff / norm)
    rel_all, gain_all = torch.stack(rel), torch.stack(gain)  # (K, B)
    return {
        "k": list(ks), "sigma": [float(sigmas[k]) for k in ks],
        "relative_change": rel_all.mean(1).tolist(), "gain": gain_all.mean(1).tolist(),
        "relative_change_all": rel_all, "gain_all": gain_all,
    }
