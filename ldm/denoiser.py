"""The ONE place for the parametrization: a network predicting eps, v or x0 becomes D(x, sigma, cond) -> x0.

Karras et al. 2022 (EDM), eq. 7: ``D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))``.
For a discrete VP model seen in the VE view ``x = x0 + sigma * eps`` (ldm/schedule.py) the input scaling is
``c_in = 1 / sqrt(sigma^2 + 1)`` (which turns x back into the network's VP latent) and

    prediction  c_skip                c_out                        training target
    eps         1                     -sigma                       eps
    v           1 / (sigma^2 + 1)     -sigma / sqrt(sigma^2 + 1)   (eps - sigma x0) / sqrt(sigma^2 + 1)   (Salimans & Ho 2022)
    x0          0                     1                            x0

The network is called with its timestep ``t = sigma_to_t(sigma)`` (``time_input='timestep'``) or with sigma
itself (``time_input='sigma'``, for continuous-time networks).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from .conditioning import Cond
from .schedule import DiscreteSchedule, ScheduleConfig
from .unet import UNet

PREDICTIONS = ("eps", "v", "x0")
TIME_INPUTS = ("timestep", "sigma")



@dataclass
class DiffusionConfig:
    """How a network relates to the noise: its training schedule and what it predicts."""

    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    prediction: str = "eps"  # eps | v | x0
    time_input: str = "timestep"  # timestep (discrete, via the schedule) | sigma (continuous)

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"diffusion.prediction: unknown value {self.prediction!r}; allowed: {', '.join(PREDICTIONS)}")
        if self.time_input not in TIME_INPUTS:
            raise ValueError(f"diffusion.time_input: unknown value {self.time_input!r}; allowed: {', '.join(TIME_INPUTS)}")


# net(x_in (B, C, H, W), t (B,), cond) -> prediction (B, C, H, W)
Network = Callable[[Tensor, Tensor, "Cond | None"], Tensor]


def _bcast(sigma: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, ...) matching x's rank."""
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def scalings(sigma: Tensor, prediction: str) -> tuple[Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in) for the table above; sigma of any shape."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction: unknown value {prediction!r}; allowed: {', '.join(PREDICTIONS)}")
    s2 = sigma**2 + 1
    c_in = s2.rsqrt()
    if prediction == "eps":
        return torch.ones_like(sigma), -sigma, c_in
    if prediction == "v":
        return 1 / s2, -sigma * c_in, c_in
    return torch.zeros_like(sigma), torch.ones_like(sigma), c_in


def training_target(prediction: str, x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """What the network should output for ``x = x0 + sigma * noise``; sigma (B,)."""
    s = _bcast(sigma.to(x0.dtype), x0)
    if prediction == "eps":
        return noise
    if prediction == "v":
        return (noise - s * x0) * (s**2 + 1).rsqrt()
    if prediction == "x0":
        return x0
    raise ValueError(f"prediction: unknown value {prediction!r}; allowed: {', '.join(PREDICTIONS)}")


class Denoiser(nn.Module):
    """Wraps a network into ``D(x, sigma, cond) -> x0`` (the only place that knows eps / v / x0)."""

    def __init__(
        self,
        net: Network,
        schedule: DiscreteSchedule | None = None,
        prediction: str = "eps",
        time_input: str = "timestep",
        quantize: bool = False,
    ):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction: unknown value {prediction!r}; allowed: {', '.join(PREDICTIONS)}")
        if time_input not in TIME_INPUTS:
            raise ValueError(f"time_input: unknown value {time_input!r}; allowed: {', '.join(TIME_INPUTS)}")
        if time_input == "timestep" and schedule is None:
            raise ValueError("Denoiser: time_input='timestep' needs the model's DiscreteSchedule")
        self.net = net
        self.schedule = schedule
        self.prediction = prediction
        self.time_input = time_input
        self.quantize = quantize  # round t to the nearest training timestep (diffusers' DPM-Solver/UniPC + Karras)

    @classmethod
    def from_config(cls, net: Network, cfg: DiffusionConfig, quantize: bool = False) -> "Denoiser":
        return cls(net, DiscreteSchedule(cfg.schedule), cfg.prediction, cfg.time_input, quantize)

    def sigma_to_input(self, sigma: Tensor) -> Tensor:
        """The network's time input for sigma: (B,) -> (B,)."""
        if self.time_input == "sigma":
            return sigma
        return self.schedule.sigma_to_t(sigma, self.quantize)

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Cond | None = None) -> Tensor:
        # x: (B, C, H, W) in the VE view; sigma: scalar or (B,)
        wide = torch.promote_types(x.dtype, torch.float32)  # keep sigma/t precise when x is fp16/bf16
        sigma = torch.as_tensor(sigma, device=x.device, dtype=wide)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        c_skip, c_out, c_in = (_bcast(c, x) for c in scalings(sigma, self.prediction))
        t = self.sigma_to_input(sigma).to(x.device, wide)
        out = self.net((x * c_in).to(x.dtype), t, cond)
        if out.shape[0] != x.shape[0]:  # one latent under k conditions (UNet.forward): k blocks of B rows
            k = out.shape[0] // x.shape[0]
            x, c_skip, c_out = (torch.cat([v] * k) for v in (x, c_skip, c_out))
        return (c_skip * x + c_out * out).to(x.dtype)

    @property
    def shares_latent(self) -> bool:
        """Whether guidance should hand the network one latent under k conditions, cond.context with k B rows for
        x's B (``UNet.forward``; the output has k B rows): a plain U-Net with speed.shared_latent on (ldm/speed.py);
        wrappers (ldm/conditions/) take one row of x per row of condition."""
        return isinstance(self.net, UNet) and self.net.share_latent
