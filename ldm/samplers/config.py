"""SamplerConfig: which sampler, how many steps, which sigmas, how much guidance, which seed.

``make_sigmas(schedule, cfg)`` turns it into the (steps + 1,) sigma schedule via
``DiscreteSchedule.sample_sigmas``. ``timestep_spacing='leading'`` with ``steps_offset=1`` is what Stable
Diffusion's shipped scheduler configs use (diffusers); ``trailing`` is what zero-terminal-SNR models need
(Lin et al. 2023, sec. 3.3). ``eta`` only matters for stochastic samplers (ancestral / SDE / DDPM / DDIM).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from ..checks import check_int
from ..config import check_choices, choice
from ..schedule import CONVENTIONS, SIGMA_SPACINGS, TIMESTEP_SPACINGS, DiscreteSchedule

FINALS = ("zero", "sigma_min")

# Where diffusers' scheduler of the same algorithm puts the steps (DiscreteSchedule.sample_sigmas), so that
# a sampler name + spacing reproduces that scheduler's trajectory.
DEFAULT_CONVENTION = {
    "ddpm": "ddim", "ddim": "ddim", "plms": "ddim",
    "dpmpp_2m": "multistep", "dpmpp_2m_sde": "multistep", "dpmpp_3m_sde": "multistep", "unipc": "multistep",
}
# Samplers with a noise scale ``eta`` (0 = deterministic).
TAKES_ETA = ("ddim", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde")


@dataclass
class SamplerConfig:
    name: str = "dpmpp_2m"  # a registered sampler (ldm.samplers.SAMPLERS)
    steps: int = 30  # number of steps, i.e. len(sigmas) - 1
    sigma_spacing: str = choice("discrete", *SIGMA_SPACINGS)  # discrete (the timesteps' sigmas) | karras | exponential
    timestep_spacing: str = choice("leading", *TIMESTEP_SPACINGS)  # diffusers' timestep_spacing
    steps_offset: int = 1  # added to 'leading' timesteps; 1 in SD's scheduler configs
    final: str = choice("zero", *FINALS)  # last sigma: 0 (denoise fully) or the schedule's sigma_min
    rho: float = 7.0  # Karras et al. 2022, eq. 5
    convention: Optional[str] = None  # euler | ddim | multistep step placement; null = as diffusers does for this sampler
    eta: Optional[float] = None  # noise scale of DDIM / ancestral / SDE samplers; null = the sampler's default
    cfg_scale: float = 7.5  # classifier-free guidance scale (1 = no guidance)
    guidance_rescale: float = 0.0  # Lin et al. 2023, sec. 3.4 (0.7 recommended with zero-terminal SNR)
    seed: Optional[int] = None  # None = random  (Optional, not `int | None`: omegaconf 2.3 needs typing.Optional)
    # analytical teleportation (ldm/samplers/teleport.py): skip this fraction of the steps with the closed-form
    # Gaussian solution; 0 = off. teleport_stats: the Gaussian statistics file that `ldm analyze` writes.
    teleport: float = 0.0
    teleport_stats: Optional[str] = None

    def __post_init__(self) -> None:
        from . import SAMPLERS  # lazy: the package registers its samplers on import; avoids an import cycle

        if self.name not in SAMPLERS:
            raise ValueError(f"sampler.name: unknown sampler {self.name!r}; allowed: {', '.join(sorted(SAMPLERS))}")
        check_choices(self, "sampler")
        check_int("sampler.steps", self.steps, 1)
        check_int("sampler.steps_offset", self.steps_offset, 0)
        if not self.rho > 0:
            raise ValueError(f"sampler.rho: must be > 0, got {self.rho!r}")
        if self.convention is not None and self.convention not in CONVENTIONS:
            raise ValueError(f"sampler.convention: unknown value {self.convention!r}; allowed: null, {', '.join(CONVENTIONS)}")
        if self.eta is not None:
            if self.name not in TAKES_ETA:
                raise ValueError(f"sampler.eta: sampler {self.name!r} has no eta; samplers with eta: {', '.join(TAKES_ETA)}")
            if not self.eta >= 0:
                raise ValueError(f"sampler.eta: must be >= 0, got {self.eta!r}")
        if not self.cfg_scale >= 0:
            raise ValueError(f"sampler.cfg_scale: must be >= 0, got {self.cfg_scale!r}")
        if not 0 <= self.guidance_rescale <= 1:
            raise ValueError(f"sampler.guidance_rescale: must be in [0, 1], got {self.guidance_rescale!r}")
        if isinstance(self.teleport, bool) or not isinstance(self.teleport, (int, float)) or not 0 <= self.teleport <= 1:
            raise ValueError(f"sampler.teleport: must be a fraction of the steps in [0, 1], got {self.teleport!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise ValueError(f"sampler.seed: must be null or an integer in [0, 2**64), got {self.seed!r}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def make_sigmas(schedule: DiscreteSchedule, cfg: SamplerConfig) -> Tensor:
    """(cfg.steps + 1,) float64 sigmas, high to low, for ``cfg`` on the model's ``schedule``."""
    convention = cfg.convention or DEFAULT_CONVENTION.get(cfg.name, "euler")
    return schedule.sample_sigmas(
        cfg.steps, cfg.timestep_spacing, cfg.sigma_spacing, cfg.steps_offset, cfg.final, cfg.rho, convention
    )


def configured_sampler(cfg: SamplerConfig, gaussian=None):
    """The sampler function of ``cfg``, with teleportation when ``cfg.teleport > 0`` (``gaussian``: a GaussianFit,
    e.g. ``ldm.analysis.load_gaussian(cfg.teleport_stats)``)."""
    from . import get_sampler
    from .teleport import with_teleport

    return with_teleport(get_sampler(cfg.name), cfg.teleport, gaussian)


def sampler_options(cfg: SamplerConfig) -> dict:
    """Keyword options for the sampler function beyond the common signature."""
    return {} if cfg.eta is None else {"eta": cfg.eta}
