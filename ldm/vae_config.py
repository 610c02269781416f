"""AutoencoderConfig: shapes and latent scaling of the KL autoencoder (the network is autoencoder/vae.py).

It lives in ``ldm`` (not beside the network) because ModelConfig composes every component's config and ``ldm``
may import nothing of ours; ``autoencoder`` imports it from here (ARCHITECTURE.md: "autoencoder and
text_encoder may import ldm (config, registry)").
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields


@dataclass
class AutoencoderConfig:
    """Shapes and latent scaling of a KL autoencoder; defaults are Stable Diffusion 1.x / 2.x (KL-f8)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4  # z_channels of the original config
    base_channels: int = 128  # ch
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # ch_mult: width of each level is base_channels * mult
    num_res_blocks: int = 2  # per encoder level; the decoder has one more per level
    norm_num_groups: int = 32  # GroupNorm groups (32 in every released model)
    scale_factor: float = 0.18215  # SD 1.x / 2.x; SDXL 0.13025
    shift_factor: float = 0.0
    use_quant_conv: bool = True  # the 1x1 quant_conv / post_quant_conv pair

    def __post_init__(self) -> None:
        ints = ("in_channels", "out_channels", "latent_channels", "base_channels", "num_res_blocks", "norm_num_groups")
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"autoencoder.{name} must be a positive integer, got {value!r}")
        try:
            mult = tuple(self.channel_mult)  # lists from YAML / OmegaConf become tuples
        except TypeError:
            mult = None
        if not mult or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in mult):
            raise ValueError(
                f"autoencoder.channel_mult must be a non-empty sequence of positive integers, got {self.channel_mult!r}"
            )
        self.channel_mult = mult
        for width in sorted({self.base_channels * m for m in mult}):
            if width % self.norm_num_groups:
                raise ValueError(
                    f"autoencoder.norm_num_groups={self.norm_num_groups} must divide every level width "
                    f"base_channels * channel_mult, but {width} is not a multiple of it"
                )
        if not (_is_finite_number(self.scale_factor) and self.scale_factor > 0):
            raise ValueError(f"autoencoder.scale_factor must be a finite number > 0, got {self.scale_factor!r}")
        if not _is_finite_number(self.shift_factor):
            raise ValueError(f"autoencoder.shift_factor must be a finite number, got {self.shift_factor!r}")
        if not isinstance(self.use_quant_conv, bool):
            raise ValueError(f"autoencoder.use_quant_conv must be a bool, got {self.use_quant_conv!r}")
        self.scale_factor, self.shift_factor = float(self.scale_factor), float(self.shift_factor)

    @property
    def downsample_factor(self) -> int:
        """f of KL-f8: each level but the last halves the resolution."""
        return 2 ** (len(self.channel_mult) - 1)

    @classmethod
    def sd(cls) -> AutoencoderConfig:
        """SD 1.x / 2.x (the published kl-f8 VAE, also vae-ft-mse)."""
        return cls()

    @classmethod
    def sdxl(cls) -> AutoencoderConfig:
        """SDXL: the same network, another latent scale."""
        return cls(scale_factor=0.13025)

    @classmethod
    def tiny(cls, **overrides) -> AutoencoderConfig:
        """A ~1M-parameter f4 model (3 levels) for CPU tests."""
        tiny = dict(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, norm_num_groups=8)
        return cls(**{**tiny, **overrides})

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


def _is_finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
