"""``scalars``: numbers (SDXL's original size, crop and target size; an aesthetic score; a strength) added to the
U-Net's vector, each as a sinusoidal embedding of ``embed_dim`` features (ldm.unet_blocks.timestep_embedding,
SDXL's ConcatTimestepEmbedderND: Podell et al. 2023, sec. 2.2). ``count=6`` is SDXL's size / crop conditioning.
"No value" is the zero vector (sgm's ucg for those embedders).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..unet_blocks import timestep_embedding
from .base import Condition, Env, register


@dataclass
class ScalarsArgs:
    count: int = 1  # numbers per sample
    embed_dim: int = 256  # sinusoidal features per number (even)

    def __post_init__(self) -> None:
        for k in ("count", "embed_dim"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{k}: an integer >= 1, got {v!r}")
        if self.embed_dim % 2:
            raise ValueError(f"embed_dim: must be even (cos and sin halves), got {self.embed_dim}")


@register("scalars")
class Scalars(Condition):
    enters = "vector"
    value = "number"
    Args = ScalarsArgs

    @classmethod
    def width(cls, spec, model) -> int:
        a = cls.parse_args(spec)
        return a.count * a.embed_dim

    def prepare(self, value, env: Env) -> Tensor:
        x = torch.as_tensor(value, dtype=torch.float32)
        x = x.reshape(-1, 1) if x.ndim <= 1 else x  # (B,) -> (B, 1)
        if x.ndim != 2 or x.shape[1] != self.args.count:
            raise ValueError(f"{self.spec.where}: expected {self.args.count} number(s) per sample (args.count), "
                             f"got shape {tuple(x.shape)}")  # fmt: skip
        if not torch.isfinite(x).all():
            raise ValueError(f"{self.spec.where}: values must be finite")
        return x.to(env.device)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        return timestep_embedding(x.flatten(), self.args.embed_dim).reshape(b, -1)  # (B, count * embed_dim)
