"""Noise schedules: betas -> alphas_cumprod <-> sigmas, timestep spacings and sigma spacings.

Everything here is plain math over float64 tensors on the CPU, independent of any network.
We use the variance-exploding view of a discrete VP model (Karras et al. 2022, "EDM", sec. 2):
a VP latent ``x_vp = sqrt(a) x0 + sqrt(1-a) eps`` is the VE latent ``x = x_vp / sqrt(a) = x0 + sigma eps``
with ``sigma = sqrt((1 - a) / a)``, ``a = alphas_cumprod[t]``. Samplers work in the VE view; the
Denoiser (ldm/denoiser.py) maps sigma back to the network's timestep.

Conventions follow diffusers' schedulers (``timestep_spacing``, ``steps_offset``, the 2**-24 terminal
alpha for zero-terminal SNR) so that sampling with a given config reproduces their trajectories.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
SIGMA_SPACINGS = ("discrete", "karras", "exponential")
# How diffusers' scheduler families place the steps (see DiscreteSchedule.sample_sigmas).
CONVENTIONS = ("euler", "ddim", "multistep")


@dataclass
class ScheduleConfig:
    """The training-time noise schedule of a discrete-time diffusion model."""

    beta_schedule: str = "scaled_linear"  # scaled_linear (SD) | linear (DDPM) | squaredcos_cap_v2 (iDDPM cosine)
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    zero_terminal_snr: bool = False  # Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed"

    def __post_init__(self) -> None:
        check_choice("schedule.beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        if self.num_train_timesteps < 2:
            raise ValueError(f"schedule.num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(
                f"schedule.beta_start/beta_end must satisfy 0 < beta_start <= beta_end < 1, "
                f"got {self.beta_start}, {self.beta_end}"
            )


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: unknown value {value!r}; allowed: {', '.join(allowed)}")


# --------------------------------------------------------------------------------------------- betas


def make_betas(cfg: ScheduleConfig) -> Tensor:
    """(T,) float64 betas for the configured schedule."""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":  # Ho et al. 2020
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float64)
    elif cfg.beta_schedule == "scaled_linear":  # Stable Diffusion: linear in sqrt(beta)
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float64) ** 2
    else:  # squaredcos_cap_v2: Nichol & Dhariwal 2021, eq. 17, betas clipped at 0.999
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float64)
    if cfg.zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2023, Algorithm 1: shift/scale sqrt(alphas_cumprod) so the last one is exactly 0."""
    abar_sqrt = torch.cumprod(1.0 - betas, 0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * first / (first - last)
    abar = abar_sqrt**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


# A zero-terminal-SNR schedule has alphas_cumprod[-1] == 0, i.e. sigma = inf. Like diffusers we replace
# it by 2**-24 (sigma ~ 4096) so that samplers starting at the last timestep stay finite.
TERMINAL_ALPHA_CUMPROD = 2.0**-24


class DiscreteSchedule:
    """alphas_cumprod of a discrete-time model and the maps between its timesteps and sigmas."""

    def __init__(self, cfg: ScheduleConfig | None = None, alphas_cumprod: Tensor | None = None):
        self.cfg = cfg or ScheduleConfig()
        if alphas_cumprod is None:
            alphas_cumprod = torch.cumprod(1.0 - make_betas(self.cfg), 0)
        ac = alphas_cumprod.detach().to("cpu", torch.float64).clone()
        if ac[-1] == 0:
            ac[-1] = TERMINAL_ALPHA_CUMPROD
        self.alphas_cumprod = ac  # (T,)
        self.sigmas = ((1 - ac) / ac).sqrt()  # (T,) increasing with t
        self.log_sigmas = self.sigmas.log()

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    # --- maps between timesteps and sigmas ----------------------------------------------------------

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Sigma at (possibly fractional) timesteps: linear interpolation of the sigma table (diffusers)."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_train_timesteps - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        w = t - lo
        return (1 - w) * self.sigmas[lo] + w * self.sigmas[hi]

    def sigma_to_t(self, sigma: Tensor, quantize: bool = False) -> Tensor:
        """Timestep for a sigma, interpolated in log-sigma (k-diffusion / diffusers ``_sigma_to_t``).

        Works on any device: the tables move to ``sigma``'s device; the result has sigma's shape and is float64
        on the CPU or float32 elsewhere. ``quantize`` rounds to the nearest training timestep, as diffusers'
        DPM-Solver and UniPC do with Karras sigmas.
        """
        sigma = torch.as_tensor(sigma)
        dtype = torch.float64 if sigma.device.type == "cpu" else torch.float32
        log_sigmas = self.log_sigmas.to(sigma.device, dtype)
        log_sigma = sigma.to(dtype).clamp(min=1e-10).log()
        dists = log_sigma.reshape(-1, 1) - log_sigmas  # (N, T)
        lo = (dists >= 0).cumsum(1).argmax(1).clamp(max=len(log_sigmas) - 2)  # last index with log_sigmas <= x
        hi = lo + 1
        w = ((log_sigmas[lo] - log_sigma.reshape(-1)) / (log_sigmas[lo] - log_sigmas[hi])).clamp(0, 1)
        t = ((1 - w) * lo + w * hi).reshape(sigma.shape)
        return t.round() if quantize else t

    def sigma_to_alpha_cumprod(self, sigma: Tensor) -> Tensor:
        return 1.0 / (1.0 + torch.as_tensor(sigma, dtype=torch.float64) ** 2)

    # --- sampling schedules --------------------------------------------------------------------------

    def timesteps(self, steps: int, spacing: str = "leading", steps_offset: int = 0, round_linspace: bool = False) -> Tensor:
        """(steps,) descending float64 timesteps, spaced as diffusers' ``timestep_spacing`` does."""
        check_steps(steps)
        check_choice("timestep spacing", spacing, TIMESTEP_SPACINGS)
        n = self.num_train_timesteps
        if steps > n:
            raise ValueError(f"steps={steps} exceeds the model's num_train_timesteps={n}")
        if spacing == "linspace":
            t = torch.linspace(0, n - 1, steps, dtype=torch.float64)
            if round_linspace:  # DDIM/DDPM/PNDM/DPM-Solver/UniPC round; Euler-family keeps fractions
                t = _np_round(t)
        elif spacing == "leading":
            t = _np_round(torch.arange(steps, dtype=torch.float64) * (n // steps)) + steps_offset
        else:  # trailing
            t = _np_round(torch.arange(n, 0, -n / steps, dtype=torch.float64)).flip(0) - 1
        return t.flip(0)

    def sample_sigmas(
        self,
        steps: int,
        spacing: str = "leading",
        sigma_spacing: str = "discrete",
        steps_offset: int = 0,
        final: str = "zero",
        rho: float = 7.0,
        convention: str = "euler",
    ) -> Tensor:
        """(steps + 1,) float64 sigmas from high to low, ending at 0 (``final='zero'``) or at sigma_min.

        ``sigma_spacing`` = ``discrete`` takes the sigmas of the spaced timesteps; ``karras`` (EDM eq. 5) and
        ``exponential`` (log-linear) respace them, as diffusers' ``use_karras_sigmas`` / ``use_exponential_sigmas``.
        ``convention`` reproduces where each diffusers scheduler family puts the steps:

        - ``euler`` (Euler, Euler a, Heun, DPM2, LMS): ``steps`` spaced timesteps, fractional for linspace;
          Karras/exponential span the spaced range;
        - ``ddim`` (DDIM, DDPM, PNDM): as ``euler`` but linspace timesteps are rounded;
        - ``multistep`` (DPM-Solver multistep, UniPC): linspace/leading space ``steps + 1`` points and drop the
          last, rounded; Karras/exponential span the whole training range [sigmas[0], sigmas[-1]].
        """
        check_choice("sigma spacing", sigma_spacing, SIGMA_SPACINGS)
        check_choice("convention", convention, CONVENTIONS)
        check_steps(steps)
        if convention == "multistep" and spacing != "trailing":
            t = self.timesteps(steps + 1, spacing, steps_offset, round_linspace=True)[:-1]
        else:
            t = self.timesteps(steps, spacing, steps_offset, round_linspace=convention != "euler")
        s = self.t_to_sigma(t)
        lo, hi = (self.sigma_min, self.sigma_max) if convention == "multistep" else (float(s[-1]), float(s[0]))
        if sigma_spacing == "karras":
            s = karras_sigmas(steps, lo, hi, rho)
        elif sigma_spacing == "exponential":
            s = exponential_sigmas(steps, lo, hi)
        return append_final(s, final, self.sigma_min)


def _np_round(t: Tensor) -> Tensor:
    """numpy's round-half-to-even, which diffusers' spacings use (torch.round agrees)."""
    return torch.round(t)


def append_final(sigmas: Tensor, final: str, sigma_min: float) -> Tensor:
    if final == "zero":
        last = 0.0
    elif final == "sigma_min":
        last = sigma_min
    else:
        raise ValueError(f"final sigma: unknown value {final!r}; allowed: zero, sigma_min")
    return torch.cat([sigmas.to(torch.float64), torch.tensor([last], dtype=torch.float64)])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """(n,) Karras et al. 2022, eq. 5: sigmas evenly spaced in sigma**(1/rho), high to low."""
    check_steps(n)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """(n,) sigmas evenly spaced in log sigma, high to low."""
    check_steps(n)
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()


def check_steps(steps: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def check_sigmas(sigmas: Tensor) -> list[float]:
    """Validate a sampling schedule and return it as Python floats (high to low, >= 0, >= 2 entries)."""
    s = torch.as_tensor(sigmas)
    if s.ndim != 1 or len(s) < 2:
        raise ValueError(f"sigmas must be a 1-D schedule with at least 2 entries (one step), got shape {tuple(s.shape)}")
    vals = s.detach().to("cpu", torch.float64).tolist()
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"sigmas must be finite, got {vals}")
    if min(vals) < 0:
        raise ValueError(f"sigmas must be >= 0, got {vals}")
    if any(b > a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"sigmas must be sorted from high to low (non-increasing), got {vals}")
    return vals
