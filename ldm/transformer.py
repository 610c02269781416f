"""The U-Net's attention layers: SpatialTransformer, BasicTransformerBlock, CrossAttention, GEGLU FeedForward.

Rombach et al. 2022 (LDM), section 3.3: image features attend to conditioning tokens (text) through
cross-attention inside a small pre-norm transformer (Vaswani et al. 2017) applied to the flattened
feature map. Names and shapes follow the original ``ldm/modules/attention.py`` so original checkpoints
load as they are; diffusers' ``Transformer2DModel`` uses the same names below the block level.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import attention
from .cached_cat import cached_cat
from .geglu import geglu, geglu_plain
from .unet_blocks import zero_module


class ContextKV(NamedTuple):
    """The context with every cross-attention's keys and values from one matmul
    (``UNetEncoder.fuse_context_projections``): ``kv`` is (B, T, sum of 2 * inner) = context @ [W_k1; W_v1; W_k2;
    ...]^T; a cross-attention reads its own columns, ``kv_columns``, and the rest of the network sees ``context``."""

    context: Tensor
    kv: Tensor


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` on ``context`` (on ``x`` itself when ``context_dim`` is None)."""

    def __init__(
        self,
        query_dim: int,
        heads: int,
        dim_head: int,
        context_dim: int | None = None,
        dropout: float = 0.0,
        backend: str = "sdpa",
        kernel: str = "auto",
    ):
        super().__init__()
        inner = heads * dim_head
        self.is_cross = context_dim is not None  # attends to a context rather than to x itself
        context_dim = context_dim or query_dim
        self.heads = heads
        self.backend = backend
        self.kernel = kernel
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))
        self.fused = False  # fuse_projections(True): one matmul for q, k, v (or k, v), ldm/speed.py
        self.register_buffer("fused_weight", None, persistent=False)  # not in the state dict
        self.kv_columns: tuple[int, int] | None = None  # this layer's columns of a ContextKV (ldm/fused_projections.py)

    def fuse_projections(self, on: bool = True) -> None:
        """Inference speed: run [to_q; to_k; to_v] (self-attention) or [to_k; to_v] (cross-attention) as one matmul
        on weights concatenated once and cached in the non-persistent buffer ``fused_weight`` (the state dict keeps
        to_q / to_k / to_v). The cache follows in-place weight changes (load_state_dict, merge_lora) by the weights'
        version counters; with gradients on, or if a projection is not a plain nn.Linear (LoRA), the separate
        projections run."""
        self.fused = on
        self.fused_weight = None

    def _fusable(self, context: Tensor | None) -> bool:
        mods = (self.to_q, self.to_k, self.to_v)
        if (context is not None) != self.is_cross or any(type(m) is not nn.Linear for m in mods):  # e.g. LoRA
            return False
        return not (torch.is_grad_enabled() and any(m.weight.requires_grad for m in mods))

    def fused_projection(self) -> Tensor:
        """(3 * inner, C) [to_q; to_k; to_v] for self-attention, (2 * inner, D) [to_k; to_v] for cross-attention;
        rebuilt when a weight changed in place or moved (ldm/cached_cat.py)."""
        mods = (self.to_k, self.to_v) if self.is_cross else (self.to_q, self.to_k, self.to_v)
        return cached_cat(self, "fused_weight", [m.weight for m in mods])

    def forward(self, x: Tensor, context: Tensor | ContextKV | None = None) -> Tensor:
        # x: (B, L, C); context: (B, T, D) or None for self-attention, or a ContextKV carrying this layer's k, v
        if isinstance(context, ContextKV):
            if self.kv_columns is not None and self.fused and self._fusable(context.context):
                a, b = self.kv_columns
                return self._forward_fused(x, context.context, context.kv[..., a:b])  # (B, T, 2 * inner) view
            context = context.context
        if self.fused and self._fusable(context):
            return self._forward_fused(x, context)
        context = x if context is None else context
        B, L, _ = x.shape
        q = self.to_q(x).view(B, L, self.heads, -1).transpose(1, 2)  # (B, nh, L, hs)
        k = self.to_k(context).view(B, context.shape[1], self.heads, -1).transpose(1, 2)  # (B, nh, T, hs)
        v = self.to_v(context).view(B, context.shape[1], self.heads, -1).transpose(1, 2)  # (B, nh, T, hs)
        out = attention(q, k, v, self.backend, self.kernel)  # (B, nh, L, hs)
        out = out.transpose(1, 2).reshape(B, L, -1)  # (B, L, nh * hs)
        return self.to_out(out)  # (B, L, C)

    def _forward_fused(self, x: Tensor, context: Tensor | None, kv: Tensor | None = None) -> Tensor:
        B, L, _ = x.shape
        if context is None:  # self-attention: one (B, L, 3 * inner) matmul
            qkv = F.linear(x, self.fused_projection()).view(B, L, 3, self.heads, -1)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, L, hs), strided views
        else:  # cross-attention: q from x, one (B, T, 2 * inner) matmul for k, v
            T = context.shape[1]
            q = self.to_q(x).view(B, L, self.heads, -1).transpose(1, 2)  # (B, nh, L, hs)
            kv = F.linear(context, self.fused_projection()) if kv is None else kv  # (B, T, 2 * inner)
            kv = kv.view(B, T, 2, self.heads, -1)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hs)
        out = attention(q, k, v, self.backend, self.kernel)  # (B, nh, L, hs)
        out = out.transpose(1, 2).reshape(B, L, -1)  # (B, L, nh * hs)
        return self.to_out(out)  # (B, L, C)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020, "GLU Variants Improve Transformer"): a * gelu(b), [a, b] = proj(x)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)
        self.triton_backward = False  # ldm/speed.py: the one-pass Triton backward (ldm/geglu.py) where it can run

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(x)  # (..., 2 * dim_out)
        return geglu(h) if self.triton_backward else geglu_plain(h)  # (..., dim_out)


class FeedForward(nn.Module):
    """GEGLU MLP with a 4x hidden width: net.0 = GEGLU, net.1 = dropout, net.2 = output projection."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _per_condition(x: Tensor, context: Tensor | ContextKV) -> Tensor:
    """x (B, ...) repeated to the context's k B rows (one latent under k conditions, UNet.forward); else x."""
    rows = (context.context if isinstance(context, ContextKV) else context).shape[0]
    return x if x.shape[0] == rows else torch.cat([x] * (rows // x.shape[0]))


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention on the context, GEGLU feed-forward."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        context_dim: int,
        dropout: float = 0.0,
        backend: str = "sdpa",
        kernel: str = "auto",
    ):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, dim_head, None, dropout, backend, kernel)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim, dropout, backend, kernel)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor | ContextKV) -> Tensor:
        # x: (B, L, C); context: (B, T, D), or (k B, T, D): k conditions on one latent (UNet.forward), where x
        # widens to k copies after the self-attention, the last layer that sees the latent alone
        x = self.attn1(self.norm1(x)) + x
        x = _per_condition(x, context)  # (k B, L, C)
        x = self.attn2(self.norm2(x), context) + x
        x = self.ff(self.norm3(x)) + x
        return x


class SpatialTransformer(nn.Module):
    """Transformer over the H*W positions of a feature map, added back as a residual.

    ``use_linear``: proj_in / proj_out are Linear layers on (B, HW, C) (SD 2.x, SDXL) instead of
    1x1 convolutions on (B, C, H, W) (SD 1.x). The same function; the weights differ only in shape.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        depth: int,
        context_dim: int,
        use_linear: bool = False,
        dropout: float = 0.0,
        groups: int = 32,
        backend: str = "sdpa",
        kernel: str = "auto",
    ):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout, backend, kernel) for _ in range(depth)
        )
        self.proj_out = zero_module(nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1))
        self.channels_last = False  # set by ldm/speed.py with channels-last weights: keep NHWC, no copy

    def forward(self, x: Tensor, context: Tensor | ContextKV) -> Tensor:
        # x: (B, C, H, W); context: (B, T, D) or (k B, T, D) (BasicTransformerBlock.forward); returns (k B, C, H, W)
        B, _, H, W = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)  # (B, inner, H, W)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, -1)  # (B, HW, inner or C)
        if self.use_linear:
            h = self.proj_in(h)  # (B, HW, inner)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            h = self.proj_out(h)  # (B, HW, C)
        h = h.reshape(h.shape[0], H, W, -1).permute(0, 3, 1, 2)  # (k B, C or inner, H, W), a strided view
        if not self.use_linear:  # (B, C, H, W); contiguous as the original, so the conv stays NCHW (or NHWC)
            h = self.proj_out(h.contiguous(memory_format=torch.channels_last if self.channels_last else
                                           torch.contiguous_format))  # fmt: skip
        return _per_condition(x, context) + h  # x first: the sum takes x's (NCHW) layout
