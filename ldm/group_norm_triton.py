"""GroupNorm (+ the SiLU after it) of channels-last activations in two Triton kernels, for U-Net inference on CUDA.

Where the time went: compiled, the SD 1.5 CFG step spends ~1.0 ms of its 5.9 ms in GroupNorm (bench/profile_unet.py,
BENCHMARKS.md, ninth session). Inductor writes each of the 61 norms as 4-5 kernels (a statistics reduction split in
two or three, then the normalisation), and its NCHW-order reduction reads channels-last memory one element per
row step: 7-26 us per norm where the bytes need 1-4 us. Eager, PyTorch's CUDA GroupNorm copies NHWC input to NCHW
and back (ldm/speed.py, ``channels_last``). Here each norm is two kernels over the (B, H*W, C) view that channels-last
memory already is, a tile of whole groups wide (``_plan``):

    stats  (B, S chunks of CHUNK rows, group tiles):  per chunk and group, mean_k and M2_k = sum (x - mean_k)^2 of its
           CHUNK x C/G elements, from one load (exact two-pass in registers)                     -> (B, S, G) each
    apply  (row tiles, B, group tiles):  each program combines its groups' S chunks (Chan et al. 1979, the parallel
           variance: mean = sum n_k mean_k / N, M2 = sum M2_k + sum n_k (mean_k - mean)^2), then
           y = x * a + b with a = rstd * weight, b = bias - mean * a, optionally silu(y), in x's dtype, NHWC

in fp32, as PyTorch's CUDA kernel (which also forms a and b). The biased variance, as GroupNorm's. The statistics do
not depend on how the rows are tiled by the apply kernel, and no atomics are used: the same input gives the same
bits on every run.

Measured (bench/group_norm_kernel.py, bench/ab_unet.py; BENCHMARKS.md, ninth session): 5-37 us per SD 1.5 norm where
PyTorch's eager one takes 12-152 us, so the default (uncompiled) CFG step went from 11.36 to 7.04 ms with NHWC
convolutions. Compiled, Inductor's own norms are faster at 64x64 and fuse their neighbours: 5.89 vs 6.57 ms, so
speed.triton_group_norm is off there by auto.

``TritonGroupNorm`` replaces nn.GroupNorm / LowPrecisionGroupNorm in place (``set_triton_group_norm``; parameter
names and the state dict do not change) and takes over the SiLU that follows it in an ``nn.Sequential``
(ResBlock's in_layers / out_layers, the U-Net's ``out``): that SiLU becomes an nn.Identity until the switch is
turned off. It runs the kernels for 4-D channels-last CUDA inputs without gradients when Triton is importable
(``torch.library.triton_op``, so torch.compile keeps them in its graph); everywhere else it is the class it
replaced, followed by the SiLU it took over. ldm/speed.py calls it (``speed.triton_group_norm``).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .geglu import TRITON, launchable  # TRITON re-exported: the one lookup of Triton, ldm/geglu.py
from .norms import LowPrecisionGroupNorm

_LANES = 128  # channel lanes of a program's tile: whole groups, contiguous channels
_BLOCK_S = 64  # chunks combined per step of the apply kernel's loop
_MAX_ROW_PROGRAMS = 128  # beyond it (latents over 128 chunks) an apply program takes several row tiles, so that the
# chunks' statistics are combined by at most this many programs per (batch, group tile), not by one per row tile
MAX_GROUP_CHANNELS = 4096  # wider groups take the plain path


def _plan(channels: int, groups: int, rows: int) -> tuple[int, int, int, int, int]:
    """A tile is K whole groups of contiguous channels, ~128 lanes wide (SD's 10-80 channels per group are not
    powers of two: spare lanes are masked). Returns (K, KP, CP, LANES, CHUNK): KP, CP and LANES are the next powers
    of two of K, of the channels per group and of the K groups' channels; CHUNK is the rows per chunk and per apply
    tile, so that the statistics' (CHUNK, KP, CP) tile has at most 8192 elements."""
    cpg = channels // groups
    k = max(1, min(groups, _LANES // cpg))
    kp, cp, lanes = 1 << (k - 1).bit_length(), 1 << (cpg - 1).bit_length(), 1 << (k * cpg - 1).bit_length()
    chunk = max(1, min(64, 8192 // (kp * cp), 1 << (rows - 1).bit_length()))
    return k, kp, cp, lanes, chunk


def group_norm_silu_reference(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float,
                              silu: bool) -> Tensor:  # fmt: skip
    """What the kernels compute, in PyTorch ops: F.group_norm (+ F.silu) in fp32, rounded once to x's dtype."""
    y = F.group_norm(x.float(), num_groups, None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)  # fmt: skip
    return (F.silu(y) if silu else y).to(x.dtype)


@torch.library.triton_op("ldm::group_norm_silu_nhwc", mutates_args=())
def group_norm_silu_triton(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float,
                    silu: bool) -> Tensor:  # fmt: skip
    """GroupNorm (+ SiLU) of x (B, C, H, W), channels-last; the result in x's dtype and layout (module docstring)."""
    import triton

    b, c, h, w = x.shape
    g = num_groups
    if c % g:
        raise ValueError(f"GroupNorm: {c} channels do not split into {g} groups")
    if not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError("group_norm_silu_triton: x must be channels-last contiguous")
    hw, cpg = h * w, c // g
    if cpg > MAX_GROUP_CHANNELS:
        raise ValueError(f"group_norm_silu_triton: {cpg} channels per group is more than {MAX_GROUP_CHANNELS}")
    k, kp, cp, lanes, chunk = _plan(c, g, hw)
    s = triton.cdiv(hw, chunk)
    tiles = triton.cdiv(g, k)
    mean = torch.empty((b, s, g), dtype=torch.float32, device=x.device)
    m2 = torch.empty((b, s, g), dtype=torch.float32, device=x.device)
    y = torch.empty_like(x)  # channels-last, x's dtype
    warps = 8 if chunk * kp * cp >= 4096 else 4
    meta = dict(CPG=cpg, K=k, KP=kp, CHUNK=chunk, num_warps=warps)
    launchable(_stats_kernel())[(b * s, tiles)](x, mean, m2, hw, c, g, s, CP=cp, **meta)
    has_w, has_b = weight is not None, bias is not None
    per = triton.cdiv(s, _MAX_ROW_PROGRAMS)  # row tiles per apply program: 1 up to 128 chunks (SD 1.5 at 512 px)
    launchable(_apply_kernel())[(triton.cdiv(s, per), b, tiles)](  # row programs first: x may exceed 65535
        x, mean, m2, weight if has_w else x, bias if has_b else x, y, hw, c, g, s, per, eps,
        HAS_W=has_w, HAS_B=has_b, SILU=silu, BLOCK_S=_BLOCK_S, LANES=lanes, **meta)
    return y


@functools.cache
def _stats_kernel():
    """Per (batch, chunk of CHUNK rows, tile of K groups): each group's mean and M2 over its chunk. The tile is
    (rows, groups, channel lanes of a group): the sums over a group are plain reductions of the last axis."""
    import triton
    import triton.language as tl

    @triton.jit
    def triton_group_norm_stats(x_ptr, mean_ptr, m2_ptr, HW, C, G, S, CPG: tl.constexpr, K: tl.constexpr,
                                KP: tl.constexpr, CP: tl.constexpr, CHUNK: tl.constexpr):  # fmt: skip
        pid = tl.program_id(0)
        bi = pid // S
        si = pid % S
        grp = tl.program_id(1) * K + tl.arange(0, KP)  # (KP,) the tile's groups
        g_ok = (tl.arange(0, KP) < K) & (grp < G)
        j = tl.arange(0, CP)  # (CP,) channel lanes of a group
        rows = si * CHUNK + tl.arange(0, CHUNK)  # (CHUNK,)
        lane_ok = g_ok[:, None] & (j < CPG)[None, :]  # (KP, CP)
        mask = (rows < HW)[:, None, None] & lane_ok[None, :, :]  # (CHUNK, KP, CP)
        offs = (bi * HW + rows).to(tl.int64)[:, None, None] * C + (grp[:, None] * CPG + j[None, :])[None, :, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        n = (tl.minimum(HW - si * CHUNK, CHUNK) * CPG).to(tl.float32)  # elements of a group in this chunk
        mu = tl.sum(tl.sum(x, axis=2), axis=0) / n  # (KP,)
        d = tl.where(mask, x - mu[None, :, None], 0.0)
        m2 = tl.sum(tl.sum(d * d, axis=2), axis=0)  # (KP,)
        out = (bi * S + si) * G + grp
        tl.store(mean_ptr + out, mu, mask=g_ok)
        tl.store(m2_ptr + out, m2, mask=g_ok)

    return triton_group_norm_stats


@functools.cache
def _apply_kernel():
    """Per (PER tiles of CHUNK rows, batch, tile of K groups): combine the groups' chunks, normalise, affine, SiLU."""
    import triton
    import triton.language as tl

    @triton.jit
    def triton_group_norm_apply(x_ptr, mean_ptr, m2_ptr, w_ptr, b_ptr, y_ptr, HW, C, G, S, PER, eps,
                                HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, BLOCK_S: tl.constexpr,
                                CPG: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, LANES: tl.constexpr,
                                CHUNK: tl.constexpr):  # fmt: skip
        bi = tl.program_id(1)
        g0 = tl.program_id(2) * K
        grp = g0 + tl.arange(0, KP)  # (KP,)
        g_ok = (tl.arange(0, KP) < K) & (grp < G)
        total = HW * CPG * 1.0  # fp32 (HW may come as a Python int: Triton specialises an argument equal to 1)
        # each group's mean over all chunks (weighted by their element counts), then its M2 (Chan et al.)
        acc = tl.zeros((KP,), dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            sk = s0 + tl.arange(0, BLOCK_S)  # (BLOCK_S,)
            m = (sk < S)[:, None] & g_ok[None, :]  # (BLOCK_S, KP)
            nk = (tl.minimum(HW - sk * CHUNK, CHUNK) * CPG).to(tl.float32)
            mk = tl.load(mean_ptr + (bi * S + sk[:, None]) * G + grp[None, :], mask=m, other=0.0)
            acc += tl.sum(tl.where(m, nk[:, None] * mk, 0.0), axis=0)
        mean = acc / total  # (KP,)
        acc2 = tl.zeros((KP,), dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            sk = s0 + tl.arange(0, BLOCK_S)
            m = (sk < S)[:, None] & g_ok[None, :]
            nk = (tl.minimum(HW - sk * CHUNK, CHUNK) * CPG).to(tl.float32)
            idx = (bi * S + sk[:, None]) * G + grp[None, :]
            dk = tl.load(mean_ptr + idx, mask=m, other=0.0) - mean[None, :]
            m2k = tl.load(m2_ptr + idx, mask=m, other=0.0)
            acc2 += tl.sum(tl.where(m, m2k + nk[:, None] * dk * dk, 0.0), axis=0)
        rstd = 1.0 / tl.sqrt(acc2 / total + eps)  # (KP,)
        lane = tl.arange(0, LANES)
        kk = lane // CPG
        lane_ok = (lane < K * CPG) & (g0 + kk < G)
        sel = kk[None, :] == tl.arange(0, KP)[:, None]  # (KP, LANES)
        a = tl.sum(tl.where(sel, rstd[:, None], 0.0), axis=0)  # (LANES,) the lane's group's rstd
        ch = g0 * CPG + lane
        if HAS_W:
            a = a * tl.load(w_ptr + ch, mask=lane_ok, other=0.0).to(tl.float32)
        shift = -tl.sum(tl.where(sel, mean[:, None], 0.0), axis=0) * a
        if HAS_B:
            shift += tl.load(b_ptr + ch, mask=lane_ok, other=0.0).to(tl.float32)
        for r in range(0, PER):  # this program's row tiles
            rows = (tl.program_id(0) * PER + r) * CHUNK + tl.arange(0, CHUNK)
            mask = (rows < HW)[:, None] & lane_ok[None, :]
            offs = (bi * HW + rows).to(tl.int64)[:, None] * C + ch[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # (CHUNK, LANES)
            y = x * a[None, :] + shift[None, :]
            if SILU:
                y = y / (1.0 + tl.exp(-y))
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    return triton_group_norm_apply


class TritonGroupNorm(nn.GroupNorm):
    """GroupNorm through ``group_norm_silu_triton`` where it can run (module docstring); otherwise the class it replaced
    (``_plain``), then SiLU when it took over the one after it (``fused_silu``)."""

    _plain: type = nn.GroupNorm
    fused_silu: bool = False

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C, H, W) -> same shape
        if runs_kernel(x, self.weight) and self.num_channels // self.num_groups <= MAX_GROUP_CHANNELS:
            return group_norm_silu_triton(x, self.num_groups, self.weight, self.bias, self.eps, self.fused_silu)
        y = self._plain.forward(self, x)
        return F.silu(y) if self.fused_silu else y


def runs_kernel(x: Tensor, weight: Tensor | None) -> bool:
    """Whether ``TritonGroupNorm`` takes the kernels for this input: CUDA, 4-D channels-last, fp16 / bf16 / fp32,
    no gradient wanted, Triton importable, not under autocast (whose GroupNorm rule is its own)."""
    grad = torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad))
    return (x.is_cuda and TRITON and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32) and not torch.is_autocast_enabled("cuda")
            and not grad)  # fmt: skip


def _fusable_sequentials(module: nn.Module) -> set[int]:
    """ids of the nn.Sequentials whose GroupNorm -> SiLU pair may become one call: all but a scale-shift ResBlock's
    out_layers, whose forward runs the norm alone and the SiLU after its own scale and shift."""
    from .unet_blocks import ResBlock

    excluded = {id(m.out_layers) for m in module.modules() if isinstance(m, ResBlock) and m.use_scale_shift_norm}
    return {id(m) for m in module.modules() if isinstance(m, nn.Sequential) and id(m) not in excluded}


def set_triton_group_norm(module: nn.Module, on: bool = True) -> int:
    """Switch every nn.GroupNorm / LowPrecisionGroupNorm in ``module`` to TritonGroupNorm (``on``), taking over the
    nn.SiLU right after it in a fusable nn.Sequential, or back. Returns how many norms were switched."""
    n = 0
    if on:
        fusable = _fusable_sequentials(module)
        for m in module.modules():
            if type(m) in (nn.GroupNorm, LowPrecisionGroupNorm):
                m._plain = type(m)
                m.__class__ = TritonGroupNorm
                n += 1
        for seq in module.modules():
            if id(seq) in fusable:
                for i in range(len(seq) - 1):
                    if type(seq[i]) is TritonGroupNorm and not seq[i].fused_silu and type(seq[i + 1]) is nn.SiLU:
                        seq[i].fused_silu = True
                        seq[i + 1] = nn.Identity()
        return n
    for seq in module.modules():
        if isinstance(seq, nn.Sequential):
            for i in range(len(seq) - 1):
                if type(seq[i]) is TritonGroupNorm and seq[i].fused_silu and type(seq[i + 1]) is nn.Identity:
                    seq[i + 1] = nn.SiLU()
    for m in module.modules():
        if type(m) is TritonGroupNorm:
            m.__class__ = m.__dict__.pop("_plain", nn.GroupNorm)
            m.__dict__.pop("fused_silu", None)
            n += 1
    return n
