"""The training objective: timestep and noise sampling, the noised input, and the loss weighting.

For a clean latent x0 (B, C, H, W), one training step draws per sample

    t      ~ U{0, ..., T-1}                          the discrete training timesteps, T = num_train_timesteps
    sigma  = sigmas[t]                               the schedule's table (ldm/schedule.py), float64
    noise  = n + noise_offset * o                    n ~ N(0, I) (B, C, H, W); o ~ N(0, 1) per (B, C, 1, 1)
                                                     (Guttenberg 2023, "Diffusion with offset noise")
    x      = x0 + sigma * (noise + input_perturbation * p)    p ~ N(0, I): Ning et al. 2023, "Input
                                                     perturbation reduces exposure bias"; the TARGET keeps `noise`

and calls the network on ``(c_in * x, sigma_to_input(sigma), cond)``. In the VE view of ldm/schedule.py,
``c_in * x = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` IS the VP sample x_t of Ho et al. 2020 (diffusers'
``DDPMScheduler.add_noise``). c_in, the target and the time input all come from ldm/denoiser.py.

The per-sample loss is ``w(t) * mean_{C,H,W} (F - target)^2``, and ``loss`` its batch mean.

Loss weightings. Let SNR(t) = abar_t / (1 - abar_t) = 1 / sigma_t^2. A prediction error maps to an x0 error
through the denoiser's c_out (ldm/denoiser.py: x0_hat = c_skip x + c_out F), so
``|x0 - x0_hat|^2 = c_out^2 |F - target|^2`` with c_out^2 = 1/SNR (eps), 1/(SNR+1) (v), 1 (x0). Every weighting
is an x0-space weight lambda(t) times c_out^2:

    weighting  lambda(t), x0 space   w(t), eps                w(t), v                       w(t), x0
    simple     1 / c_out^2           1                        1                             1
    min_snr    min(SNR, g)           min(SNR, g) / SNR        min(SNR, g) / (SNR + 1)       min(SNR, g)
    vdm        D(t) / m              (SNR(t-1)/SNR(t) - 1)/m  D(t) / (SNR + 1) / m          D(t) / m

with g = min_snr_gamma, SNR = SNR(t), D(t) = SNR(t-1) - SNR(t) (D(0) = 0) and m the mean over t of the
column's unnormalised entries (so that every vdm column averages 1 over t).

- simple: Ho et al. 2020, L_simple (the plain MSE on whatever the network predicts).
- min_snr: Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy", exactly as
  diffusers' examples/text_to_image/train_text_to_image.py computes it for eps and v.
- vdm: Kingma et al. 2021 ("Variational Diffusion Models", eq. 13 for discrete T): the diffusion term of the
  discrete-time ELBO is ``sum_{t>=1} 1/2 (SNR(t-1) - SNR(t)) |x0 - x0_hat(x_t)|^2`` (Ho et al. 2020's
  L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))). The t = 0 term is the decoder term L_0, not a
  diffusion term: its weight is 0. With kappa = ``vdm_elbo_constant`` = 1/2 sum_t D(t) c_out(t)^2 = T m / 2,
  ``ELBO diffusion term(x0) = C*H*W * kappa * E_{t, noise}[per-sample loss]`` (nats).

Zero-terminal SNR (Lin et al. 2023): the schedule stores abar_T = 2**-24 instead of 0 (sigma ~ 4096), so
every weight stays finite: at that step eps/min_snr is 1 (the limit of min(SNR, g)/SNR as SNR -> 0, where
diffusers' formula gives 0/0 = NaN), v and x0 min_snr ~6e-8, and the eps vdm weight large (~80 for SD's
schedule: eps predicted from (almost) pure noise says (almost) nothing about x0; Lin et al. use v).
The network input at that step is 2**-12 x0 + noise, not pure noise. See docs/loss_weighting.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import Tensor

from .conditioning import Cond
from .denoiser import Denoiser, DiffusionConfig, Network, _bcast, scalings, training_target
from .samplers.common import randn_per_sample
from .schedule import DiscreteSchedule

WEIGHTINGS = ("simple", "min_snr", "vdm")
GeneratorArg = Union[torch.Generator, Sequence[torch.Generator], None]  # one for the batch or one per sample


@dataclass
class LossConfig:
    weighting: str = "simple"  # simple | min_snr | vdm
    min_snr_gamma: float = 5.0  # Hang et al. 2023
    noise_offset: float = 0.0  # Guttenberg 2023 ("diffusion with offset noise"); 0.05 - 0.1 typical
    input_perturbation: float = 0.0  # Ning et al. 2023; 0.1 in diffusers' train_text_to_image

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"loss.weighting: unknown value {self.weighting!r}; allowed: {', '.join(WEIGHTINGS)}")
        if not self.min_snr_gamma > 0:
            raise ValueError(f"loss.min_snr_gamma: must be > 0, got {self.min_snr_gamma}")
        for name in ("noise_offset", "input_perturbation"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"loss.{name}: must be >= 0, got {getattr(self, name)}")


@dataclass
class NoiseDraw:
    """The random numbers of one step, unscaled (the config scales them); float32 when made by ``draw``."""

    t: Tensor  # (B,) int64 training timesteps
    noise: Tensor  # (B, C, H, W)
    offset: Tensor  # (B, C, 1, 1)
    perturbation: Tensor  # (B, C, H, W)


@dataclass
class LossOutput:
    loss: Tensor  # () mean over the batch of the weighted per-sample losses
    per_sample: Tensor  # (B,) weighted
    timesteps: Tensor  # (B,) int64 sampled training timesteps
    sigmas: Tensor  # (B,)
    weights: Tensor  # (B,) w(t) of each sample (per_sample = weights * unweighted MSE)


# --------------------------------------------------------------------------------------------- weights


def snr(schedule: DiscreteSchedule) -> Tensor:
    """(T,) float64 SNR(t) = abar / (1 - abar) = 1 / sigma^2."""
    return schedule.sigmas.reciprocal().square()


def _vdm_raw(schedule: DiscreteSchedule, prediction: str) -> Tensor:
    """(T,) float64 (SNR(t-1) - SNR(t)) * c_out(t)^2, 0 at t = 0 (the decoder term L_0)."""
    s = snr(schedule)
    delta = torch.cat([s.new_zeros(1), s[:-1] - s[1:]])  # (T,)
    c_out = scalings(schedule.sigmas, prediction)[1]
    return delta * c_out.square()


def loss_weights(schedule: DiscreteSchedule, prediction: str, cfg: LossConfig) -> Tensor:
    """(T,) float64 w(t) multiplying the prediction-space MSE (table in the module docstring)."""
    if cfg.weighting == "simple":
        return torch.ones_like(schedule.sigmas)
    if cfg.weighting == "vdm":
        raw = _vdm_raw(schedule, prediction)
        return raw / raw.mean()
    s = snr(schedule)
    c_out = scalings(schedule.sigmas, prediction)[1]
    if prediction == "eps":  # min(SNR, gamma) * sigma^2, written to be exactly 1 where SNR <= gamma
        return torch.clamp(cfg.min_snr_gamma / s, max=1.0)
    return torch.clamp(s, max=cfg.min_snr_gamma) * c_out.square()


def vdm_elbo_constant(schedule: DiscreteSchedule, prediction: str) -> float:
    """kappa = 1/2 sum_t (SNR(t-1) - SNR(t)) c_out(t)^2, so that under the ``vdm`` weighting the discrete ELBO's
    diffusion term of x0 (in nats, summed over its D = C*H*W dimensions) is ``D * kappa * E_{t, noise}[per_sample]``.
    For x0-prediction it telescopes to (SNR(0) - SNR(T-1)) / 2."""
    return float(_vdm_raw(schedule, prediction).sum() / 2)


# --------------------------------------------------------------------------------------------- the loss


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp16/bf16 latents: noise and loss in fp32


def _check_generator(g):
    if g is not None and not isinstance(g, torch.Generator):
        raise ValueError(f"generator: expected a torch.Generator, one per sample, or None; got {type(g).__name__}")
    return g


class DiffusionLoss:
    """``loss = DiffusionLoss(net, diffusion_cfg, loss_cfg)(x0, cond, generator)``.

    ``net(x_in (B, C, H, W), t (B,), cond) -> prediction (B, C, H, W)`` is the network (the DDP-wrapped one in
    distributed training). ``generator`` may be one generator for the batch or one per sample; with one per
    sample, sample i's draws (t, noise, offset, perturbation, in that order) depend only on generator i, so a
    sample's loss does not depend on the batch it sits in. The same four draws are made whatever the config,
    so toggling noise_offset or input_perturbation changes nothing else.
    """

    def __init__(self, net: Network, diffusion_cfg: DiffusionConfig, cfg: LossConfig | None = None):
        self.net = net
        self.cfg = cfg if cfg is not None else LossConfig()
        self.denoiser = Denoiser.from_config(net, diffusion_cfg)  # its sigma_to_input: the network's time input
        self.schedule: DiscreteSchedule = self.denoiser.schedule
        self.prediction = diffusion_cfg.prediction
        self.weights = loss_weights(self.schedule, self.prediction, self.cfg)  # (T,) float64, CPU

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_train_timesteps

    def __call__(self, x0: Tensor, cond: Cond | None, generator: GeneratorArg = None) -> LossOutput:
        return self.compute(x0, cond, self.draw(x0, generator))

    def draw(self, x0: Tensor, generator: GeneratorArg = None) -> NoiseDraw:
        """The random numbers for one step: drawn in float32 on the generator's device (as the samplers' noise,
        so fp16/fp32/fp64 runs see the same numbers), then moved to x0's device."""
        if x0.ndim < 2 or x0.shape[0] < 1:
            raise ValueError(f"x0: expected (B, C, ...) with B >= 1, got shape {tuple(x0.shape)}")
        B, C = x0.shape[:2]
        T, dev = self.num_train_timesteps, x0.device
        offset_shape = (C,) + (1,) * (x0.ndim - 2)
        if isinstance(generator, Sequence):  # row b from generators[b] only, in the order t, noise, offset, pert.
            if len(generator) != B:
                raise ValueError(f"generator: {len(generator)} generators for a batch of {B}")
            for g in generator:
                _check_generator(g)
            t = torch.cat([torch.randint(0, T, (1,), generator=g, device=g.device).to(dev) for g in generator])
            noise = randn_per_sample(generator, x0.shape[1:], dev, torch.float32)  # (B, C, H, W)
            offset = randn_per_sample(generator, offset_shape, dev, torch.float32)  # (B, C, 1, 1)
            perturbation = randn_per_sample(generator, x0.shape[1:], dev, torch.float32)  # (B, C, H, W)
            return NoiseDraw(t, noise, offset, perturbation)
        g = _check_generator(generator)
        gdev = g.device if g is not None else dev
        t = torch.randint(0, T, (B,), generator=g, device=gdev)  # (B,)
        noise = torch.randn(x0.shape, generator=g, device=gdev)  # (B, C, H, W)
        offset = torch.randn((B,) + offset_shape, generator=g, device=gdev)  # (B, C, 1, 1)
        perturbation = torch.randn(x0.shape, generator=g, device=gdev)  # (B, C, H, W)
        return NoiseDraw(*(v.to(dev) for v in (t, noise, offset, perturbation)))

    def compute(self, x0: Tensor, cond: Cond | None, draw: NoiseDraw) -> LossOutput:
        """The loss for given draws (``draw`` holds unscaled standard-normal numbers; see the module docstring)."""
        self._check(x0, draw)
        dev, wide = x0.device, _wide(x0.dtype)
        t = draw.t.to(dev)  # (B,)
        t_cpu = draw.t.cpu()
        sigma = self.schedule.sigmas[t_cpu]  # (B,) float64 on the CPU: exact table values
        c_in = scalings(sigma, self.prediction)[2]  # (B,) = sqrt(abar_t)
        t_in = self.denoiser.sigma_to_input(sigma)  # (B,) the integer t again for timestep networks

        x0w = x0.to(wide)
        noise = draw.noise.to(dev, wide)  # (B, C, H, W): also the target's noise
        if self.cfg.noise_offset:
            noise = noise + self.cfg.noise_offset * draw.offset.to(dev, wide)  # (B, C, 1, 1) broadcast
        noise_in = noise
        if self.cfg.input_perturbation:
            noise_in = noise + self.cfg.input_perturbation * draw.perturbation.to(dev, wide)
        sigma_w = sigma.to(dev, wide)
        x = x0w + _bcast(sigma_w, x0w) * noise_in  # (B, C, H, W) VE latent
        x_in = (_bcast(c_in.to(dev, wide), x0w) * x).to(x0.dtype)  # = sqrt(abar) x0 + sqrt(1-abar) noise_in (VP)

        out = self.net(x_in, t_in.to(dev, wide), cond)  # (B, C, H, W)
        if out.shape != x0.shape:
            raise ValueError(f"net: returned shape {tuple(out.shape)} for input {tuple(x0.shape)}")
        target = training_target(self.prediction, x0w, noise, sigma_w)  # (B, C, H, W)
        mse = (out.to(wide) - target).square().flatten(1).mean(1)  # (B,)
        w = self.weights[t_cpu].to(dev, wide)  # (B,)
        per_sample = mse * w
        return LossOutput(loss=per_sample.mean(), per_sample=per_sample, timesteps=t, sigmas=sigma_w, weights=w)

    def _check(self, x0: Tensor, d: NoiseDraw) -> None:
        B, C = x0.shape[:2]
        if d.t.shape != (B,) or d.t.dtype.is_floating_point or d.t.dtype == torch.bool:
            raise ValueError(f"draw.t: expected {B} integer timesteps, got {d.t.dtype} of shape {tuple(d.t.shape)}")
        if int(d.t.min()) < 0 or int(d.t.max()) >= self.num_train_timesteps:
            raise ValueError(f"draw.t: timesteps must lie in [0, {self.num_train_timesteps}), got {d.t.tolist()}")
        for name, want in (("noise", x0.shape), ("perturbation", x0.shape), ("offset", (B, C) + (1,) * (x0.ndim - 2))):
            if tuple(getattr(d, name).shape) != tuple(want):
                raise ValueError(f"draw.{name}: expected shape {tuple(want)}, got {tuple(getattr(d, name).shape)}")
