"""SDXL's two text towers as one module: prompts -> (context (B, 77, 768 + 1280), pooled (B, 1280)).

As sgm's GeneralConditioner with the SDXL base embedders:
- embedder 0, CLIP ViT-L/14 (FrozenCLIPEmbedder, layer "hidden", layer_idx 11): penultimate block, no final norm,
  tokenized by transformers' CLIPTokenizer (pad 49407);
- embedder 1, OpenCLIP ViT-bigG/14 (FrozenOpenCLIPEmbedder2, layer "penultimate", always_return_pooled): penultimate
  block, no final norm, plus pooled = ln_final(last)[argmax(ids)] @ text_projection, tokenized by open_clip (pad 0).

Cross-attention tokens are the two hidden states concatenated along features, in that order; the pooled vector is
bigG's alone (the pipeline appends the size / crop embeddings to it).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ldm.text_config import SDXLTextConfig

from text_encoder.encoder import ClipTextEncoder


class SDXLTextEncoders(nn.Module):
    """(ids_l (B, T), ids_g (B, T)) -> (context (B, T, D_l + D_g), pooled (B, P_g)). State keys: clip_l.*, bigg.*"""

    def __init__(self, cfg: SDXLTextConfig | None = None):
        super().__init__()
        self.cfg = cfg = SDXLTextConfig() if cfg is None else cfg
        if not isinstance(cfg, SDXLTextConfig):
            raise ValueError(f"cfg must be an SDXLTextConfig, got {type(cfg).__name__}")
        self.clip_l = ClipTextEncoder(cfg.clip_l)
        self.bigg = ClipTextEncoder(cfg.bigg)

    def tokenize(self, prompts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """Prompts -> (ids_l, ids_g), each (B, context_length) with its tower's padding (49407 and 0)."""
        return self.clip_l.tokenize(prompts), self.bigg.tokenize(prompts)

    def forward(self, ids_l: Tensor, ids_g: Tensor) -> tuple[Tensor, Tensor]:
        if ids_l.shape != ids_g.shape:
            raise ValueError(f"ids_l and ids_g must have the same shape (B, T), got {tuple(ids_l.shape)} and "
                             f"{tuple(ids_g.shape)}")  # fmt: skip
        h_l, _ = self.clip_l(ids_l)  # (B, T, D_l)
        h_g, pooled = self.bigg(ids_g)  # (B, T, D_g), (B, P_g)
        return torch.cat([h_l, h_g], dim=-1), pooled  # (B, T, D_l + D_g), (B, P_g)

    def encode(self, prompts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """Prompts -> (context, pooled) on this module's device."""
        ids_l, ids_g = self.tokenize(prompts)
        device = self.clip_l.token_embedding.weight.device
        return self(ids_l.to(device), ids_g.to(device))

