"""GroupNorm written for channels-last (NHWC) activations, for compiled U-Nets: coalesced reads, same numbers.

PyTorch's GroupNorm (and Inductor's decomposition of it) views the input as (B, G, C/G * H * W) in NCHW order. On a
channels-last tensor that order walks memory with a stride of C: compiled (torch 2.11), each of the SD 1.5 U-Net's
fused GroupNorm kernels loaded one bf16 per 1,280-byte row step (``bench/results/profile_unet_b2_compiled_full.txt``
and the generated code: 11-17 us per 64x64-level norm where its bytes need ~2-3 us), and where the input is a skip
``cat`` Inductor even wrote the concatenation NCHW, read it back uncoalesced and copied it to NHWC for the next
convolution (up to 56 us for one norm).

``group_norm_nhwc`` computes the same normalisation from the (B, H*W, G, C/G) view that channels-last memory already
is:

    per group:  mean, var  over the (H*W, C/G) block      (B, G)     one reduction per group whose index walks
                                                                      the group's C/G contiguous channels, then
                                                                      the next row
    y = x * a + b,  a = rstd * weight,  b = bias - mean * a        (B, H*W, C) one pass, C contiguous

in fp32 (as PyTorch's CUDA kernel: it too forms a = rstd * weight and b = bias - mean * a), written in the input's
dtype and layout. The variance is a biased one, as GroupNorm's. ``ChannelsLastGroupNorm`` uses it for 4-D
channels-last inputs and is otherwise the class it replaced (nn.GroupNorm or ldm/norms.py's
LowPrecisionGroupNorm; under autocast only the latter's inputs take the NHWC path, with its contract: the
autocast dtype out). ``set_nhwc_group_norm(module, on)`` switches a model's norms in place by class, as ldm/norms.py
does; parameter names and the state dict do not change. ldm/speed.py calls it (``speed.nhwc_group_norm``).

Measured (BENCHMARKS.md): the compiled SD 1.5 CFG step 5.967 -> 5.705 ms (tenth session, one process, graphs replayed
in turns). The sixth session's form (per-channel statistics over H*W, combined per group by the law of total variance)
gave 5.860 ms in that call and had measured 0.04-0.05 ms slower than Inductor's own norms before: Inductor splits the
per-channel reduction into two kernels, the second on a handful of blocks. Compiled training (eleventh session): 221.1 ->
218.1 ms per 512 px step, 102.7 -> 101.0 ms at 256 px, with less peak memory. So the switch is on by auto whenever the
U-Net is compiled on CUDA, for inference and training.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .norms import LowPrecisionGroupNorm


def group_norm_nhwc(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """GroupNorm of ``x`` (B, C, H, W), computed from its (B, H*W, G, C/G) view (free for channels-last memory);
    statistics and the affine map in fp32, the result in x's dtype and channels-last layout."""
    b, c, h, w = x.shape
    g = num_groups
    if c % g:
        raise ValueError(f"GroupNorm: {c} channels do not split into {g} groups")
    xs = x.permute(0, 2, 3, 1).reshape(b, h * w, c).float()  # (B, HW, C)
    var, mean = torch.var_mean(xs.view(b, h * w, g, c // g), dim=(1, 3), correction=0)  # (B, G) each
    rstd, mean = torch.rsqrt(var + eps).unsqueeze(-1), mean.unsqueeze(-1)  # (B, G, 1) each
    a = rstd.expand(b, g, c // g) if weight is None else rstd * weight.float().view(g, c // g)  # (B, G, C/G)
    shift = -mean * a if bias is None else bias.float().view(g, c // g) - mean * a  # (B, G, C/G)
    y = xs * a.reshape(b, 1, c) + shift.reshape(b, 1, c)  # (B, HW, C)
    return y.to(x.dtype).view(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last


class ChannelsLastGroupNorm(nn.GroupNorm):
    """GroupNorm that normalises 4-D channels-last inputs with ``group_norm_nhwc``; any other input goes to the
    class it replaced (``_plain``: nn.GroupNorm or LowPrecisionGroupNorm)."""

    _plain: type = nn.GroupNorm

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C, H, W)
        if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
            return self._plain.forward(self, x)
        dev = x.device.type
        if not torch.is_autocast_enabled(dev):
            return group_norm_nhwc(x, self.num_groups, self.weight, self.bias, self.eps)
        if self._plain is LowPrecisionGroupNorm and x.dtype == torch.get_autocast_dtype(dev):
            with torch.autocast(dev, enabled=False):  # LowPrecisionGroupNorm's contract: the autocast dtype out
                w = None if self.weight is None else self.weight.to(x.dtype)
                b = None if self.bias is None else self.bias.to(x.dtype)
                return group_norm_nhwc(x, self.num_groups, w, b, self.eps)
        return self._plain.forward(self, x)  # what autocast makes of group_norm (fp32 on CUDA) is its own rule

def set_nhwc_group_norm(module: nn.Module, on: bool = True) -> int:
    """Switch every nn.GroupNorm / LowPrecisionGroupNorm in ``module`` to ChannelsLastGroupNorm (``on``) or back to
    the class it was; other subclasses are left alone. Returns how many were switched."""
    n = 0
    for m in module.modules():
        if on and type(m) in (nn.GroupNorm, LowPrecisionGroupNorm):
            plain = type(m)
            m.__class__ = ChannelsLastGroupNorm
            m._plain = plain
            n += 1
        elif not on and type(m) is ChannelsLastGroupNorm:
            m.__class__ = m.__dict__.pop("_plain", nn.GroupNorm)
            n += 1
    return n
