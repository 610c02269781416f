"""The top-level schema of a preset (configs/*.yaml): one field per section, each a component's own dataclass.

To add a section: import its dataclass and add ``name: Cls = field(default_factory=Cls)``.
"""
from dataclasses import dataclass, field

from .denoiser import DiffusionConfig
from .samplers.config import SamplerConfig


@dataclass
class RunConfig:
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
