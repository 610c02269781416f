"""The convolutional Encoder and Decoder of the KL autoencoder (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", appendix G; the VQGAN backbone of Esser et al. 2021).

Module names and parameter shapes follow the original code, `ldm/modules/diffusionmodules/model.py` of
CompVis/latent-diffusion (the same file in Stability-AI/stablediffusion and generative-models), so a
Stable Diffusion checkpoint's ``first_stage_model.*`` tensors load here after stripping that prefix:

    encoder.conv_in
    encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut}   i = 0 .. levels-1 (high -> low res)
    encoder.down.{i}.downsample.conv                                      all levels but the last
    encoder.mid.{block_1,attn_1,block_2}           attn_1.{norm,q,k,v,proj_out}  (q/k/v/proj_out: 1x1 convs)
    encoder.norm_out, encoder.conv_out
    decoder.conv_in, decoder.mid.*
    decoder.up.{i}.block.{j}, decoder.up.{i}.upsample.conv               i = levels-1 .. 0 is the ORDER APPLIED:
                                                                          up.{i} works at the resolution of down.{i}
    decoder.norm_out, decoder.conv_out

Differences from the original, none of which changes a number beyond float rounding:
  * attention runs through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU)
    instead of an explicit softmax(q k^T / sqrt(C)) v with a (B, HW, HW) matrix;
  * the 1x1 q/k/v/proj_out convolutions are applied as ``F.linear`` on (B, HW, C) tokens, with the very
    same (C, C, 1, 1) parameters, which saves two transposes;
  * no ``attn_resolutions`` (empty in every KL-f* config of SD 1/2/XL), no dropout, no timestep embedding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def Normalize(channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm as in the original: 32 groups, eps 1e-6, affine."""
    return nn.GroupNorm(num_groups=num_groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: x + conv(silu(norm(conv(silu(norm(x)))))), 1x1 shortcut on a width change."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int = 32):
        super().__init__()
        self.norm1 = Normalize(in_channels, num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels, num_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        # the original's `nin_shortcut` ("network in network"); use_conv_shortcut=False in every SD config
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:  # (B, Cin, H, W) -> (B, Cout, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all H*W positions, residual (the original's "vanilla" AttnBlock)."""

    def __init__(self, channels: int, num_groups: int = 32):
        super().__init__()
        self.norm = Normalize(channels, num_groups)
        self.q = nn.Conv2d(channels, channels, 1)  # weights (C, C, 1, 1): the original checkpoint layout
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    @staticmethod
    def _pointwise(conv: nn.Conv2d, x: Tensor) -> Tensor:  # 1x1 conv on tokens: (B, N, C) -> (B, N, C)
        return F.linear(x, conv.weight.flatten(1), conv.bias)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W)
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q = self._pointwise(self.q, h).unsqueeze(1)  # (B, 1, HW, C): one head of width C
        k = self._pointwise(self.k, h).unsqueeze(1)
        v = self._pointwise(self.v, h).unsqueeze(1)
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, (B, 1, HW, C)
        h = self._pointwise(self.proj_out, h.squeeze(1))  # (B, HW, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    """Halve H and W: pad right/bottom by one (the original's asymmetric pad), then a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour interpolation, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """The bottleneck shared by encoder and decoder: resnet -> attention -> resnet at the lowest resolution."""

    def __init__(self, channels: int, num_groups: int = 32):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, num_groups)
        self.attn_1 = AttnBlock(channels, num_groups)
        self.block_2 = ResnetBlock(channels, channels, num_groups)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, h, w)
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: a list of resnet blocks (``block``) and an optional resampler.

    The attribute names ``block`` / ``downsample`` / ``upsample`` are those of the original's anonymous
    ``nn.Module()`` containers, so the state-dict keys match.
    """

    def __init__(
        self, blocks: list[ResnetBlock], downsample: nn.Module | None = None, upsample: nn.Module | None = None
    ):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.downsample = downsample  # None registers no parameters: the key is simply absent
        self.upsample = upsample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    """(B, in_channels, H, W) image -> (B, 2*z_channels, H/f, W/f) posterior moments, f = 2**(levels-1)."""

    def __init__(
        self,
        in_channels: int,
        z_channels: int,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        num_groups: int = 32,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            block_in, block_out = ch * in_ch_mult[i], ch * mult
            blocks = [
                ResnetBlock(block_in if j == 0 else block_out, block_out, num_groups) for j in range(num_res_blocks)
            ]
            last = i == len(ch_mult) - 1
            self.down.append(Level(blocks, downsample=None if last else Downsample(block_out)))
        block_in = ch * ch_mult[-1]
        self.mid = MidBlock(block_in, num_groups)
        self.norm_out = Normalize(block_in, num_groups)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels, kernel_size=3, stride=1, padding=1)  # double_z

    def forward(self, x: Tensor) -> Tensor:  # (B, Cin, H, W)
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            h = level(h)  # ... -> (B, ch*ch_mult[-1], H/f, W/f)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2*z, H/f, W/f)


class Decoder(nn.Module):
    """(B, z_channels, h, w) latent -> (B, out_channels, h*f, w*f) image."""

    def __init__(
        self,
        out_channels: int,
        z_channels: int,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        num_groups: int = 32,
    ):
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = MidBlock(block_in, num_groups)
        levels: list[Level] = []
        for i in reversed(range(len(ch_mult))):  # built lowest resolution first, stored by level index
            block_out = ch * ch_mult[i]
            blocks = []
            for _ in range(num_res_blocks + 1):  # one more resnet per level than the encoder
                blocks.append(ResnetBlock(block_in, block_out, num_groups))
                block_in = block_out
            levels.insert(0, Level(blocks, upsample=Upsample(block_in) if i != 0 else None))
        self.up = nn.ModuleList(levels)  # up[i] is at the resolution of encoder.down[i]; applied i = L-1 .. 0
        self.norm_out = Normalize(block_in, num_groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z: Tensor) -> Tensor:  # (B, z, h, w)
        h = self.mid(self.conv_in(z))  # (B, ch*ch_mult[-1], h, w)
        for level in reversed(self.up):
            h = level(h)  # ... -> (B, ch*ch_mult[0], h*f, w*f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, Cout, h*f, w*f)
