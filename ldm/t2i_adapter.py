"""T2I-Adapter (Mou et al. 2023): a small convolutional network turning a hint image into one feature map per
U-Net level, added inside the U-Net's down path: ``unet(x, t, cond, adapter=features)``.

Layout and names are TencentARC's ``Adapter`` (ldm/modules/encoders/adapter.py) with the settings of its released
full adapters (``sk=True, ksize=1, use_conv=False``: t2iadapter_*_sd14v1, *_sd15v2), which is diffusers'
``T2IAdapter(adapter_type="full_adapter")``; ldm/t2i_adapter_keys.py translates diffusers' names. With r =
num_res_blocks and d = downscale_factor (8, the VAE's factor):

    hint (B, in_channels, d H, d W) -> PixelUnshuffle(d) -> (B, d^2 in_channels, H, W)
    conv_in                 3x3 conv -> channels[0]
    body.{l r + j}          block j of level l: [2x2 average pool if l > 0 and j == 0]
                            [in_conv: 1x1 conv channels[l-1] -> channels[l] where the width changes]
                            x + block2(relu(block1(x)))          block1 3x3, block2 1x1
    features[l]             level l's last block output: (B, channels[l], ceil(H / 2^l), ceil(W / 2^l))

The average pool rounds odd sizes up (diffusers' ceil_mode=True, like the U-Net's stride-2 convolutions; the
original floors them, which only differs for sizes the original never saw). ``channels`` must be the U-Net's
level widths; feature l is added where ``UNet.adapter_slots()[l]`` says. The XL and light adapters (diffusers'
full_adapter_xl / light_adapter) have other bodies and are not built here; the U-Net takes their features all the same.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class T2IAdapterConfig:
    in_channels: int = 3  # hint channels (RGB maps: 3; the sketch and canny adapters: 1)
    channels: tuple[int, ...] = (320, 640, 1280, 1280)  # one per U-Net level: that level's width (SD 1.x / 2.x)
    num_res_blocks: int = 2  # blocks per level (the original's nums_rb)
    downscale_factor: int = 8  # pixel unshuffle: image size -> latent size

    def __post_init__(self) -> None:
        self.channels = tuple(self.channels)
        for name in ("in_channels", "num_res_blocks", "downscale_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"t2i_adapter.{name}: must be >= 1, got {getattr(self, name)}")
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"t2i_adapter.channels: needs one or more positive widths, got {self.channels}")


class AdapterBlock(nn.Module):
    """The original ``ResnetBlock`` with sk=True, ksize=1, use_conv=False: (B, C_in, H, W) -> (B, C_out, H', W')."""

    def __init__(self, in_channels: int, out_channels: int, down: bool):
        super().__init__()
        self.down = down
        self.in_conv = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.block1 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(out_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.down:
            x = F.avg_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)  # (B, C_in, ceil(H/2), ceil(W/2))
        if self.in_conv is not None:
            x = self.in_conv(x)  # (B, C_out, H', W')
        return x + self.block2(self.act(self.block1(x)))


class T2IAdapter(nn.Module):
    """``adapter(hint (B, in_channels, d H, d W)) -> (features[l] (B, channels[l], H_l, W_l) for each level l)``."""

    def __init__(self, cfg: T2IAdapterConfig):
        super().__init__()
        self.cfg = cfg
        c, r = cfg.channels, cfg.num_res_blocks
        self.unshuffle = nn.PixelUnshuffle(cfg.downscale_factor)
        self.conv_in = nn.Conv2d(cfg.in_channels * cfg.downscale_factor**2, c[0], 3, padding=1)
        self.body = nn.ModuleList(
            AdapterBlock(c[l - 1] if l and j == 0 else c[l], c[l], down=l > 0 and j == 0)
            for l in range(len(c))
            for j in range(r)
        )

    def forward(
        self, hint: Tensor, scale: float = 1.0, latent_size: tuple[int, int] | None = None
    ) -> tuple[Tensor, ...]:
        """hint: the control image, in [0, 1] as the published adapters were trained; ``scale``: multiplies every
        feature (diffusers' adapter_conditioning_scale); ``latent_size``: (H, W) of the latent the features are for,
        checked against the hint's size (d H, d W)."""
        self._check_hint(hint, latent_size)
        x = self.conv_in(self.unshuffle(hint))  # (B, channels[0], H, W)
        r = self.cfg.num_res_blocks
        features = []
        for l in range(len(self.cfg.channels)):
            for block in self.body[l * r : (l + 1) * r]:
                x = block(x)
            features.append(x * scale)  # (B, channels[l], H_l, W_l)
        return tuple(features)

    def _check_hint(self, hint: Tensor, latent_size: tuple[int, int] | None) -> None:
        cfg, d = self.cfg, self.cfg.downscale_factor
        if not isinstance(hint, Tensor) or hint.ndim != 4 or hint.shape[1] != cfg.in_channels:
            got = tuple(hint.shape) if isinstance(hint, Tensor) else type(hint).__name__
            raise ValueError(f"hint: expected (B, {cfg.in_channels}, H, W) (t2i_adapter.in_channels), got {got}")
        size = tuple(hint.shape[2:])
        if latent_size is not None and size != (latent_size[0] * d, latent_size[1] * d):
            raise ValueError(
                f"hint: expected (B, {cfg.in_channels}, {latent_size[0] * d}, {latent_size[1] * d}) = {d} x the "
                f"latent's {latent_size[0]} x {latent_size[1]} (the image size), got {tuple(hint.shape)}"
            )
        if size[0] % d or size[1] % d:
            raise ValueError(f"hint: height and width must be multiples of t2i_adapter.downscale_factor={d}, got "
                             f"{tuple(hint.shape)}")  # fmt: skip
