"""The U-Net's convolutional pieces: timestep embedding, ResBlock, Downsample, Upsample.

Module and parameter names follow the original LDM / SGM ``openaimodel.py`` (Ho et al. 2020's U-Net as
improved by Dhariwal & Nichol 2021), so that an original checkpoint's ``model.diffusion_model.*`` keys
load after stripping that prefix. The original wraps GroupNorm in ``GroupNorm32`` (normalize in fp32,
cast back); we use plain ``nn.GroupNorm`` in the model dtype like diffusers: the same in fp32, one
copy less in half precision (where autocast already runs group norm in fp32; ldm/norms.py keeps it in bf16).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017) as in the original openaimodel: (B,) -> (B, dim), fp32.

    ``[cos(t f_0) .. cos(t f_{h-1}), sin(t f_0) .. sin(t f_{h-1})]`` with ``f_i = max_period^(-i/h)``,
    ``h = dim // 2`` (cos first: diffusers' flip_sin_to_cos=True, downscale_freq_shift=0).
    """
    half = dim // 2
    # Computed on t's device, in this order, so that it matches diffusers' get_timestep_embedding bit for bit.
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t[:, None].float() * torch.exp(exponent)[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters (the original's init for layers that end a residual branch)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def cat_channels(h: Tensor, skip: Tensor) -> Tensor:
    """torch.cat([h, skip], dim=1) for the up path's skip connections, (B, C, H, W) + (B, C_skip, H, W) ->
    (B, C + C_skip, H, W), written channels-last when both inputs are.

    Same values as torch.cat, and in eager the same strides. Under torch.compile it matters: Inductor lowers the
    cat to a pointwise kernel whose layout is free, lays it out NCHW, and the GroupNorm + SiLU that feeds the next
    convolution then reads it in NCHW order while writing NHWC (uncoalesced, ~5x its bytes' time at 64x64). Taking
    the cat over the last dim of the (B, H, W, C) views fixes the result's layout to NHWC."""
    if h.dim() == 4 and all(t.is_contiguous(memory_format=torch.channels_last) for t in (h, skip)):
        return torch.cat([h.permute(0, 2, 3, 1), skip.permute(0, 2, 3, 1)], dim=-1).permute(0, 3, 1, 2)
    return torch.cat([h, skip], dim=1)


class EmbTable(NamedTuple):
    """Every ResBlock's time-embedding projection from one matmul (``UNetEncoder.fuse_emb_projections``):
    ``table`` is (B', sum of the blocks' widths) = silu(emb) @ [W_1; W_2; ...]^T + [b_1; b_2; ...]; a ResBlock
    reads its own columns, ``emb_columns``."""

    table: Tensor


class ResBlock(nn.Module):
    """Residual block conditioned on the time embedding (Dhariwal & Nichol 2021, with the optional
    scale-shift norm "AdaGN": ``h = norm(h) * (1 + scale) + shift``); without it the embedding is added."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int | None = None,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = False,
        groups: int = 32,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, channels, eps=1e-5),
            nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels),
        )
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out_channels, eps=1e-5),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        self.emb_columns: tuple[int, int] | None = None  # this block's columns of an EmbTable (ldm/fused_projections.py)

    def forward(self, x: Tensor, emb: Tensor | EmbTable) -> Tensor:
        # x: (B, C, H, W); emb: (B', E) with B' >= B (the U-Net pads it, see UNet._forward), or the projections of
        # every block at once, (B', sum of widths)
        h = self.in_layers(x)  # (B, C_out, H, W)
        if isinstance(emb, EmbTable):
            if self.emb_columns is None:
                raise RuntimeError("ResBlock got an EmbTable but has no emb_columns (UNetEncoder.fuse_emb_projections)")
            e = emb.table[:, self.emb_columns[0] : self.emb_columns[1]]  # (B', C_out or 2 C_out)
        else:
            e = self.emb_layers(emb)  # (B', C_out or 2 C_out)
        e = e[: x.shape[0], :, None, None]  # (B, C_out or 2 C_out, 1, 1)
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            for layer in self.out_layers[1:]:
                h = layer(h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h  # (B, C_out, H, W)


class Downsample(nn.Module):
    """Strided 3x3 convolution: (B, C, H, W) -> (B, C_out, ceil(H/2), ceil(W/2))."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.op = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling then a 3x3 convolution: (B, C, H, W) -> (B, C_out, 2H, 2W).

    ``size`` overrides the 2x target (the skip connection's size when the input was not divisible
    by the total downsampling factor; diffusers' ``upsample_size``)."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)
