"""Prompts -> the conditions the U-Net receives (``ldm.conditioning.Cond``), for each model family.

    enc = PromptEncoder(bundle, clip_skip=None)
    cond, uncond = enc.conds(["a fox", "a fox"], ["blurry", "blurry"], height=1024, width=1024)  # Cond, Cond | None

What each family gets, matching the diffusers pipelines:

    context   every tower's hidden states concatenated along features (text_encoder.prompts.encode_prompts: long
              prompts in 75-token chunks, emphasis, BREAK; clip skip applies to the first tower only, i.e. SD's
              one tower and SDXL's CLIP-L as the webui's "sdxl_clip_l_skip" -- bigG keeps its penultimate layer)
    vector    SD 1.x / 2.x: none. SDXL (Podell et al. 2023, sec. 2.2; diffusers' ``add_time_ids``): bigG's pooled
              text (B, P) followed by a 256-wide sinusoid (ldm.unet_blocks.timestep_embedding) of each of the 6 ids
              ``original_size (h, w), crop_coords (top, left), target_size (h, w)``; diffusers' defaults are
              original = target = the generated (height, width) and crop (0, 0), used here.
              A custom model whose vector is exactly the pooled width gets the pooled vector alone.
    uncond    the negative prompt encoded like the prompt (SD: the empty prompt when there is none), except for
              SDXL base with an empty negative: all zeros, context and pooled, as diffusers'
              ``force_zeros_for_empty_prompt`` (the size ids stay, as its ``negative_add_time_ids``).

Token lengths: a prompt and its negative are padded to the same number of 77-token chunks with the encoding of the
empty prompt (the webui's ``pad_cond``; zeros for a zero negative), and so are the rows of one network batch. A row
is therefore bit-identical whatever batch it is in, as long as the batch's prompts have the same number of chunks
(at most 75 tokens each, say).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ldm.bundle import Bundle
from ldm.conditioning import Cond
from ldm.model_config import SDXL_SIZE_EMBED_DIM, SDXL_SIZE_IDS, sdxl_size_embedding
from text_encoder.prompts import encode_prompts

VECTOR_KINDS = ("none", "pooled", "sdxl")


def vector_kind(bundle: Bundle) -> str:
    """How the U-Net's vector condition is made: none, pooled text alone, or SDXL's pooled + size ids.
    ValueError for a vector width that none of these gives."""
    cfg = bundle.config
    adm, pooled = cfg.unet.adm_in_channels - cfg.condition_widths()["vector"], cfg.pooled_dim  # conditions add the rest
    if not adm:
        return "none"
    if pooled and adm == pooled + SDXL_SIZE_IDS * SDXL_SIZE_EMBED_DIM:
        return "sdxl"
    if pooled and adm == pooled:
        return "pooled"
    sdxl = pooled + SDXL_SIZE_IDS * SDXL_SIZE_EMBED_DIM
    raise ValueError(
        f"model: the U-Net takes a {adm}-wide vector, but the pipeline can only build the pooled text ({pooled}) or "
        f"SDXL's pooled text + {SDXL_SIZE_IDS} size ids x {SDXL_SIZE_EMBED_DIM} ({sdxl})"
    )


def zeros_for_empty_negative(bundle: Bundle) -> bool:
    """SDXL base's ``force_zeros_for_empty_prompt`` (diffusers' StableDiffusionXLPipeline default)."""
    return bundle.config.family == "sdxl"


def size_embedding(batch: int, original_size: tuple[int, int], crop: tuple[int, int], target_size: tuple[int, int],
                   *, device=None) -> Tensor:  # fmt: skip
    """(B, 6 * 256) float32: the same ids (h, w, top, left, h, w) for every row (ldm.model_config.sdxl_size_embedding)."""
    ids = torch.tensor([[*original_size, *crop, *target_size]], dtype=torch.float32, device=device)  # (1, 6)
    return sdxl_size_embedding(ids).expand(batch, -1)


@dataclass
class _Text:
    context: Tensor  # (1, 77 k, D)
    pooled: Tensor | None  # (1, P)
    zero: bool = False  # the all-zeros negative (padded with zeros, not with the empty prompt)


class PromptEncoder:
    """Encodes prompts with a bundle's text towers; each distinct prompt is encoded once (cached)."""

    def __init__(self, bundle: Bundle, clip_skip: int | None = None):
        self.bundle = bundle
        self.clip_skip = clip_skip
        self.vector = vector_kind(bundle)
        self._cache: dict[str, _Text] = {}

    @torch.no_grad()
    def text(self, prompt: str) -> _Text:
        """One prompt -> context (1, 77 k, sum of tower widths) and pooled (1, P) or None."""
        if prompt not in self._cache:
            hidden, pooled = [], None
            for i, tower in enumerate(self.bundle.text):
                h, p = encode_prompts(tower, [prompt], clip_skip=self.clip_skip if i == 0 else None)
                hidden.append(h)  # (1, 77 k, D_i)
                pooled = p if p is not None else pooled
            self._cache[prompt] = _Text(torch.cat(hidden, dim=-1), pooled)
        return self._cache[prompt]

    def conds(self, prompts: Sequence[str], negatives: Sequence[str], *, height: int, width: int,
              guided: bool = True, original_size: tuple[int, int] | None = None, crop: tuple[int, int] = (0, 0),
              target_size: tuple[int, int] | None = None) -> tuple[Cond, Cond | None]:  # fmt: skip
        """Rows of (prompt, negative) -> (cond, uncond or None when not guided), each with B = len(prompts) rows.
        SDXL's size ids (h, w) / (top, left): ``original_size`` and ``target_size`` default to (height, width)."""
        if len(prompts) != len(negatives) or not prompts:
            raise ValueError(f"conds: {len(prompts)} prompts and {len(negatives)} negatives; need as many, >= 1")
        pos = [self.text(p) for p in prompts]
        neg = [self._negative(n, p) for n, p in zip(negatives, pos)] if guided else []
        tokens = max(t.context.shape[1] for t in pos + neg)  # pad every row to the longest
        size = (original_size or (height, width), tuple(crop), target_size or (height, width))
        cond = self._cond(pos, tokens, size)
        return cond, (self._cond(neg, tokens, size) if guided else None)

    # ---- helpers ----

    def _negative(self, negative: str, positive: _Text) -> _Text:
        if negative == "" and zeros_for_empty_negative(self.bundle):
            pooled = None if positive.pooled is None else torch.zeros_like(positive.pooled)
            return _Text(torch.zeros_like(positive.context), pooled, zero=True)
        return self.text(negative)

    def _pad(self, t: _Text, tokens: int) -> Tensor:
        """(1, T, D) -> (1, tokens, D) with whole chunks of the empty prompt's encoding (zeros for a zero row)."""
        missing = tokens - t.context.shape[1]
        if missing == 0:
            return t.context
        empty = torch.zeros_like(t.context[:, :1]) if t.zero else self.text("").context  # (1, 77, D) or (1, 1, D)
        reps = missing // empty.shape[1]
        return torch.cat([t.context, empty.expand(reps, -1, -1).reshape(1, reps * empty.shape[1], -1)], dim=1)

    def _cond(self, rows: list[_Text], tokens: int, size: tuple) -> Cond:
        context = torch.cat([self._pad(t, tokens) for t in rows])  # (B, tokens, D)
        if self.vector == "none":
            return Cond(context=context)
        pooled = torch.cat([t.pooled for t in rows])  # (B, P)
        if self.vector == "pooled":
            return Cond(context=context, vector=pooled)
        emb = size_embedding(len(rows), *size, device=pooled.device).to(pooled.dtype)  # original, crop, target
        return Cond(context=context, vector=torch.cat([pooled, emb], dim=-1))  # (B, P + 1536)
