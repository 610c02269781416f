"""Recording a reverse process: the state x entering each step and the network's x0 prediction there.

    traj = record_trajectory(get_sampler("dpmpp_2m"), denoise, x, sigmas)
    traj.xs      # (S + 1, B, C, H, W): x entering steps 0 .. S-1, then the final sample
    traj.x0s     # (S, B, C, H, W): the x0 prediction D(x_k, sigma_k) the sampler saw at step k
    traj.sigmas  # (S + 1,) float64

It uses the samplers' per-step ``callback`` (ldm/samplers/common.py), so it works with every sampler unchanged;
a second-order sampler reports its first evaluation of each step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..samplers.common import Sampler, Step


@dataclass
class Trajectory:
    xs: Tensor  # (S + 1, B, ...) float32, on the CPU
    x0s: Tensor  # (S, B, ...)
    sigmas: Tensor  # (S + 1,) float64

    @property
    def steps(self) -> int:
        return self.x0s.shape[0]

    def vp_states(self) -> Tensor:
        """(S + 1, B, ...) the states in the network's (VP) scale, x / sqrt(1 + sigma^2) (ldm/denoiser.py c_in):
        noise of unit variance at the start, the sample at the end."""
        c = (1 + self.sigmas**2).rsqrt().to(self.xs.dtype)
        return self.xs * c.reshape(-1, *([1] * (self.xs.ndim - 1)))


def record_trajectory(sampler: Sampler, denoise, x: Tensor, sigmas: Tensor, **options) -> Trajectory:
    """Run ``sampler(denoise, x, sigmas, callback=..., **options)`` and keep every step's x and x0 prediction."""
    xs, x0s = [], []

    def keep(step: Step) -> None:
        if step.i == len(xs):  # a sampler may report a step more than once: keep the first
            xs.append(step.x.detach().float().cpu())
            x0s.append(step.denoised.detach().float().cpu())

    final = sampler(denoise, x, sigmas, callback=keep, **options)
    steps = len(sigmas) - 1
    if len(xs) != steps:
        raise RuntimeError(f"record_trajectory: the sampler reported {len(xs)} of its {steps} steps")
    xs.append(final.detach().float().cpu())
    return Trajectory(torch.stack(xs), torch.stack(x0s), torch.as_tensor(sigmas, dtype=torch.float64).cpu())
