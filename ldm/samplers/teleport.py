"""Analytical teleportation as an option of every sampler (Wang & Vastola 2023, "Diffusion models generate images
like painters", sec. 4): skip the first part of the reverse process with the closed-form probability-flow ODE
solution of a Gaussian model of the data (ldm/analysis/gaussian.py), then run the sampler on the rest.

    sample = with_teleport(get_sampler("dpmpp_2m"), fraction=0.2, gaussian=fit)   # same signature as any sampler
    z = sample(denoise, x, sigmas, noise=..., callback=...)

With ``steps = len(sigmas) - 1`` and ``k = round(fraction * steps)``, x jumps from ``sigmas[0]`` to ``sigmas[k]``
with ``gaussian.teleport`` (no network call), and the sampler runs on ``sigmas[k:]``; its callback's step index is
shifted by k so that progress counts stay those of the full schedule. ``k = 0`` is the sampler itself, bit for
bit; ``k = steps`` is the Gaussian's solution alone. No sampler is edited: the jump is done here, once.

``gaussian`` is any object with ``teleport(x, sigma_from, sigma_to) -> x`` (GaussianFit does this exactly for
N(mu, Sigma) data, so on Gaussian data teleportation is exact: tests/test_analysis.py).
"""
from __future__ import annotations

import math
from typing import Protocol

from torch import Tensor

from .common import Callback, DenoiseFn, NoiseFn, Sampler, Step, prepare


class Teleporter(Protocol):
    def teleport(self, x: Tensor, sigma_from, sigma_to) -> Tensor: ...


def teleport_steps(fraction: float, steps: int) -> int:
    """k = round(fraction * steps): how many steps the jump replaces (round half to even, as Python's round)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ValueError(f"teleport: the fraction of steps to skip must be a number in [0, 1], got {fraction!r}")
    return int(round(fraction * steps))


def teleported_sampling(sampler: Sampler, denoise: DenoiseFn, x: Tensor, sigmas: Tensor, fraction: float,
                        gaussian: Teleporter | None, *, noise: NoiseFn | None = None,
                        callback: Callback | None = None, **options) -> Tensor:  # fmt: skip
    """Jump analytically over the first ``round(fraction * steps)`` steps, then ``sampler`` on the rest."""
    s = prepare(x, sigmas)
    k = teleport_steps(fraction, len(s) - 1)
    if k == 0:
        return sampler(denoise, x, sigmas, noise=noise, callback=callback, **options)
    if gaussian is None:
        raise ValueError("teleport: a fraction > 0 needs the data's Gaussian statistics (ldm analyze writes them)")
    x = gaussian.teleport(x, s[0], s[k])
    if k == len(s) - 1:
        return x
    shifted = None if callback is None else _shift(callback, k)
    return sampler(denoise, x, sigmas[k:], noise=noise, callback=shifted, **options)


def with_teleport(sampler: Sampler, fraction: float, gaussian: Teleporter | None) -> Sampler:
    """``sampler`` with teleportation over the first ``fraction`` of its steps; the same signature."""
    teleport_steps(fraction, 1)  # checks the fraction now
    if fraction == 0:
        return sampler

    def sample(denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, noise: NoiseFn | None = None,
               callback: Callback | None = None, **options) -> Tensor:  # fmt: skip
        return teleported_sampling(sampler, denoise, x, sigmas, fraction, gaussian, noise=noise, callback=callback,
                                   **options)  # fmt: skip

    sample.__name__ = f"{getattr(sampler, '__name__', 'sampler')}_teleport"
    sample.__doc__ = sampler.__doc__
    return sample


def _shift(callback: Callback, k: int) -> Callback:
    def shifted(step: Step) -> None:
        callback(Step(step.i + k, step.x, step.sigma, step.sigma_next, step.denoised))

    return shifted


def evaluations_saved(fraction: float, steps: int) -> float:
    """The fraction of the steps (hence of the network evaluations of a one-call-per-step sampler) skipped."""
    return teleport_steps(fraction, steps) / steps if steps else math.nan
