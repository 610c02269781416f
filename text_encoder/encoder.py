"""A CLIP text tower built from open_clip's modules: token ids (B, T) -> hidden states (B, T, D) [+ pooled (B, P)].

The math is open_clip's: ``open_clip.transformer.Transformer`` (pre-LN ``ResidualAttentionBlock`` s with
``nn.MultiheadAttention``), open_clip's ``LayerNorm``, and an additive causal mask. Parameter names are those of
``open_clip.CLIP`` without the vision tower, so SD 2.x / SDXL-bigG checkpoints (``cond_stage_model.model.*``,
``conditioner.embedders.1.model.*``) load by identity, and transformers' ``CLIPTextModel`` layout (SD 1.x, SDXL
CLIP-L) goes through ``text_encoder.keys``:

    token_embedding.weight                      (V, D)
    positional_embedding                        (T, D)
    transformer.resblocks.{i}.ln_1 / attn.in_proj_* / attn.out_proj / ln_2 / mlp.c_fc / mlp.c_proj
    ln_final.weight, ln_final.bias              (D,)
    text_projection                             (D, P)   only when projection_dim is set

What each Stable Diffusion generation reads out of the tower (``TextEncoderConfig`` presets):

    sd1          CLIP ViT-L/14 (OpenAI)   last block, ln_final                      (ldm FrozenCLIPEmbedder)
    sd2          OpenCLIP ViT-H/14        penultimate block, ln_final               (ldm FrozenOpenCLIPEmbedder)
    sdxl_clip_l  CLIP ViT-L/14 (OpenAI)   penultimate block, no ln_final            (sgm FrozenCLIPEmbedder, layer_idx 11)
    sdxl_bigg    OpenCLIP ViT-bigG/14     penultimate block, no ln_final; pooled =  (sgm FrozenOpenCLIPEmbedder2)
                                          ln_final(last block)[argmax(ids)] @ text_projection

``layer`` indexes the L + 1 hidden states as transformers' ``output_hidden_states`` does: 0 is the token +
position embedding, i the output of block i, negative counts from the end (-1 = "last", -2 = "penultimate").
"Clip skip k" is ``layer = -k`` (``TextEncoderConfig.with_clip_skip``). Only the blocks needed are run, unless
the pooled output (always from the last block) is asked for.
"""
from __future__ import annotations

from typing import Sequence

import torch
from open_clip.transformer import LayerNorm, QuickGELU, Transformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.text_config import TextEncoderConfig

from text_encoder.tokenizer import tokenize

ACTIVATIONS = {"quick_gelu": QuickGELU, "gelu": nn.GELU}


def causal_mask(t: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(T, T) additive mask, -inf above the diagonal: token i attends to tokens 0..i (as open_clip's attn_mask)."""
    return torch.full((t, t), float("-inf"), dtype=dtype, device=device).triu_(1)


class ClipTextEncoder(nn.Module):
    """Token ids (B, T <= context_length) -> (hidden (B, T, D), pooled (B, P) or None); see the module docstring."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        if not isinstance(cfg, TextEncoderConfig):
            raise ValueError(f"cfg must be a TextEncoderConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(
            width=cfg.width, layers=cfg.layers, heads=cfg.heads, act_layer=ACTIVATIONS[cfg.act],
            norm_layer=LayerNorm, batch_first=True,
        )  # fmt: skip
        self.ln_final = LayerNorm(cfg.width)
        if cfg.projection_dim is not None:
            self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.projection_dim))
        else:
            self.text_projection = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """open_clip's TextTransformer initialization (pretrained weights replace it; this keeps fresh towers sane)."""
        d, n = self.cfg.width, self.cfg.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=d**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=d**-0.5 * (2 * n) ** -0.5)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * d) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=d**-0.5 * (2 * n) ** -0.5)
        if self.text_projection is not None:
            nn.init.normal_(self.text_projection, std=d**-0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def tokenize(self, prompts: str | Sequence[str]) -> Tensor:
        """Prompts -> (B, context_length) ids with this tower's padding convention (cfg.pad_id)."""
        return tokenize(prompts, self.cfg.context_length, pad_id=self.cfg.pad_id)

    def forward(self, ids: Tensor, layer: str | int | None = None) -> tuple[Tensor, Tensor | None]:
        """ids (B, T) -> (hidden (B, T, D), pooled (B, P) or None). ``layer`` overrides cfg.layer (e.g. clip skip)."""
        cfg = self.cfg
        k = cfg.layer_index(layer)  # blocks that produce the hidden output
        self._check_ids(ids)
        b, t = ids.shape

        x = self.token_embedding(ids) + self.positional_embedding[:t]  # (B, T, D)
        mask = causal_mask(t, x.dtype, x.device)  # (T, T)
        hidden = x
        n_run = cfg.layers if cfg.return_pooled else k
        for i, block in enumerate(self.transformer.resblocks[:n_run]):
            if self.transformer.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, None, None, mask, use_reentrant=False)
            else:
                x = block(x, attn_mask=mask)  # (B, T, D)
            if i + 1 == k:
                hidden = x

        pooled = None
        if cfg.return_pooled:
            last = self.ln_final(x)  # (B, T, D)
            pooled = last[torch.arange(b, device=ids.device), ids.argmax(dim=-1)]  # (B, D) at the first end token
            if self.text_projection is not None:
                pooled = pooled @ self.text_projection  # (B, P)
            if cfg.final_norm and k == cfg.layers:
                return last, pooled
        if cfg.final_norm:
            hidden = self.ln_final(hidden)  # (B, T, D)
        return hidden, pooled

    def _check_ids(self, ids: Tensor) -> None:
        cfg = self.cfg
        if not isinstance(ids, Tensor) or ids.dtype not in (torch.int64, torch.int32) or ids.ndim != 2:
            raise ValueError("ids must be an integer tensor of shape (B, T) (int64 or int32)")
        if not 1 <= ids.shape[1] <= cfg.context_length:
            raise ValueError(f"ids length T must be in [1, {cfg.context_length}] (context_length), got {ids.shape[1]}")
        if not ids.is_meta and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size):
            raise ValueError(f"ids must lie in [0, {cfg.vocab_size}) (vocab_size)")
