"""Inference speed for the U-Net: one matmul for a projection that many layers apply to the same input.

- ``fuse_emb_projections`` (``speed.fused_emb``): every ResBlock's time-embedding projection (``emb_layers``: SiLU,
  Linear) as silu(emb) @ [W_1; W_2; ...]^T + [b_1; b_2; ...]; each block reads its columns of the result (an
  ``EmbTable``, ldm/unet_blocks.py). SD 1.5 had 22 matmuls of 2-4 rows there.
- ``fuse_context_projections`` (``speed.fused_context_kv``): every cross-attention's keys and values of the text,
  context @ [W_k1; W_v1; W_k2; W_v2; ...]^T; each layer reads its columns (a ``ContextKV``, ldm/transformer.py).
  Acts where the layers' own fused projections would run (``CrossAttention.fuse_projections``).

The weights are concatenated once and cached in non-persistent buffers (the state dict keeps each layer's weights;
ldm/cached_cat.py rebuilds a cache when a weight changes in place or moves). With gradients on, or where a
projection is not a plain nn.Linear (LoRA), every layer projects for itself. ``FusedProjections`` is a mixin of
UNetEncoder (ldm/unet.py); UNet's forward calls ``_block_emb`` and ``_block_context``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cached_cat import cached_cat
from .transformer import ContextKV, CrossAttention
from .unet_blocks import EmbTable, ResBlock


def _assign_columns(layers: Sequence[nn.Module], attr: str, width: Callable[[nn.Module], int], on: bool) -> tuple:
    """Set each layer's ``attr`` to its (start, end) columns of the joint output, in order (None when off); returns
    the layers when on, () when off."""
    start = 0
    for layer in layers:
        setattr(layer, attr, (start, start + width(layer)) if on else None)
        start += width(layer)
    return tuple(layers) if on else ()


class FusedProjections:
    """Mixin for an nn.Module holding ResBlocks and CrossAttentions (UNetEncoder)."""

    def _init_fused_projections(self) -> None:
        self.emb_fused = False  # fuse_emb_projections(True)
        self.context_fused = False  # fuse_context_projections(True)
        self._emb_blocks: tuple = ()  # the layers that read columns, in module order (set when fused)
        self._kv_layers: tuple = ()
        self.register_buffer("emb_fused_weight", None, persistent=False)  # not in the state dict
        self.register_buffer("emb_fused_bias", None, persistent=False)
        self.register_buffer("context_fused_weight", None, persistent=False)

    def fuse_emb_projections(self, on: bool = True) -> None:
        """Switch the joint time-embedding projection on or off (module docstring)."""
        self.emb_fused = on
        self.emb_fused_weight = self.emb_fused_bias = None
        blocks = [m for m in self.modules() if isinstance(m, ResBlock)]
        self._emb_blocks = _assign_columns(blocks, "emb_columns", lambda b: b.emb_layers[1].out_features, on)

    def fuse_context_projections(self, on: bool = True) -> None:
        """Switch the joint context key / value projection on or off (module docstring)."""
        self.context_fused = on
        self.context_fused_weight = None
        attns = [m for m in self.modules() if isinstance(m, CrossAttention) and m.is_cross]
        self._kv_layers = _assign_columns(attns, "kv_columns", lambda a: a.to_k.out_features + a.to_v.out_features, on)

    def _emb_fusable(self) -> bool:
        lins = [b.emb_layers[1] for b in self._emb_blocks]
        if not lins or any(type(m) is not nn.Linear or m.bias is None for m in lins):  # e.g. LoRA
            return False
        return not (torch.is_grad_enabled() and any(m.weight.requires_grad or m.bias.requires_grad for m in lins))

    def _context_fusable(self, context: Tensor) -> bool:
        return bool(self._kv_layers) and all(a.fused and a._fusable(context) for a in self._kv_layers)

    def fused_emb_projection(self) -> tuple[Tensor, Tensor]:
        """(sum of widths, 4 mc) weight and (sum of widths,) bias, the blocks' in module order."""
        lins = [b.emb_layers[1] for b in self._emb_blocks]
        return (cached_cat(self, "emb_fused_weight", [m.weight for m in lins]),
                cached_cat(self, "emb_fused_bias", [m.bias for m in lins]))  # fmt: skip

    def fused_context_projection(self) -> Tensor:
        """(sum of 2 * inner, context_dim): [to_k; to_v] of every cross-attention, in module order."""
        return cached_cat(self, "context_fused_weight",
                          [w for a in self._kv_layers for w in (a.to_k.weight, a.to_v.weight)])  # fmt: skip

    def _block_emb(self, emb: Tensor) -> Tensor | EmbTable:
        """What the ResBlocks get: emb (B', 4 mc) itself, or all their projections of it at once (EmbTable)."""
        if not (self.emb_fused and self._emb_fusable()):
            return emb
        weight, bias = self.fused_emb_projection()
        return EmbTable(F.linear(F.silu(emb), weight, bias))  # (B', sum of widths)

    def _block_context(self, context: Tensor) -> Tensor | ContextKV:
        """What the transformers get: the context (B, T, D) itself, or with every cross-attention's k, v of it."""
        if not (self.context_fused and self._context_fusable(context)):
            return context
        return ContextKV(context, F.linear(context, self.fused_context_projection()))  # kv: (B, T, sum of 2 * inner)
