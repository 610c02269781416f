"""What every sampler shares: the one signature, the per-step callback, noise sources and the registry.

Every sampler is a plain function (k-diffusion's shape, typed):

    sample_x(denoise, x, sigmas, *, noise=None, callback=None, **options) -> x

- ``denoise(x (B, C, H, W), sigma (B,)) -> x0 (B, C, H, W)``: a Denoiser with its conditioning bound,
  usually wrapped by guidance (ldm/guidance.py);
- ``x``: the starting latent in the VE view, e.g. ``noise * sigmas[0]``;
- ``sigmas``: (N + 1,) non-increasing, >= 0; the result is the latent at ``sigmas[-1]``;
- ``noise(sigma, sigma_next) -> (B, C, H, W)`` standard normal noise for stochastic samplers; use
  ``per_sample_noise`` so that each image depends only on its own seed, never on its batch;
- ``callback(Step)`` after each model evaluation of a step (progress bars, previews, trajectories).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor

from ..schedule import check_sigmas

DenoiseFn = Callable[[Tensor, Tensor], Tensor]
NoiseFn = Callable[[float, float], Tensor]


@dataclass
class Step:
    i: int  # step index, 0 .. len(sigmas) - 2
    x: Tensor  # (B, C, H, W) the latent entering step i
    sigma: float
    sigma_next: float
    denoised: Tensor  # (B, C, H, W) the x0 prediction at (x, sigma)


Callback = Callable[[Step], None]


class Sampler(Protocol):
    def __call__(
        self, denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, noise: NoiseFn | None = None,
        callback: Callback | None = None, **options,
    ) -> Tensor: ...


def sigma_vec(x: Tensor, sigma: float) -> Tensor:
    """(B,) sigma for a batch, at least float32 so the timestep stays precise for half-precision x."""
    return torch.full((x.shape[0],), sigma, device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))


def prepare(x: Tensor, sigmas: Tensor) -> list[float]:
    """Validate inputs shared by all samplers; return sigmas as Python floats."""
    if not torch.is_tensor(x) or x.ndim < 2:
        raise ValueError(f"x must be a batched tensor (B, ...), got {type(x).__name__} {getattr(x, 'shape', '')}")
    return check_sigmas(sigmas)


def randn_noise(x: Tensor) -> NoiseFn:
    """Noise from torch's global generator (not batch-invariant; pipelines use per_sample_noise)."""
    return lambda sigma, sigma_next: torch.randn_like(x)


def per_sample_noise(generators: Sequence[torch.Generator], like: Tensor) -> NoiseFn:
    """Noise drawn sample by sample, each from its own generator, so image k depends only on seed k.

    Generators may live on the CPU (reproducible across devices) or on ``like``'s device.
    """
    if len(generators) != like.shape[0]:
        raise ValueError(f"per_sample_noise: {len(generators)} generators for a batch of {like.shape[0]}")

    def draw(sigma: float, sigma_next: float) -> Tensor:
        return randn_per_sample(generators, like.shape[1:], like.device, like.dtype)

    return draw


def randn_per_sample(generators: Sequence[torch.Generator], shape, device, dtype) -> Tensor:
    """(B, *shape) standard normal, row b from generators[b]."""
    rows = [torch.randn(tuple(shape), generator=g, device=g.device, dtype=torch.float32) for g in generators]
    return torch.stack(rows).to(device=device, dtype=dtype)


def check_nonnegative(name: str, value: float) -> float:
    """A finite real option >= 0 (eta, s_noise ...), as a float; ValueError naming the option otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_positive_before_last(s: list[float]) -> None:
    """Only the final sigma may be 0: eps = (x - D) / sigma is undefined at sigma = 0."""
    if min(s[:-1]) <= 0:
        raise ValueError(f"sigmas: only the last entry may be 0 (eps = (x - x0) / sigma needs sigma > 0), got {s}")


def to_d(x: Tensor, sigma: float, denoised: Tensor) -> Tensor:
    """The probability-flow ODE derivative dx/dsigma = (x - D(x; sigma)) / sigma (EDM eq. 3)."""
    return (x - denoised) / sigma


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) splitting a step into a deterministic part and fresh noise (k-diffusion)."""
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - up**2) ** 0.5, up


# ------------------------------------------------------------------------------------------ registry

SAMPLERS: dict[str, Sampler] = {}
STOCHASTIC: set[str] = set()


def register(name: str, stochastic: bool = False):
    def deco(fn):
        if name in SAMPLERS:
            raise ValueError(f"sampler {name!r} registered twice")
        SAMPLERS[name] = fn
        if stochastic:
            STOCHASTIC.add(name)
        return fn

    return deco


def get_sampler(name: str) -> Sampler:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; allowed: {', '.join(sorted(SAMPLERS))}") from None
