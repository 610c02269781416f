"""Captions and image sizes to the ``Cond`` the U-Net trains on; per-sample random streams; condition dropout.

    towers = TextTowers(bundle.text)                  # an nn.Module, so a trained text encoder can be DDP-wrapped
    context, pooled = towers(tokenize(towers, texts))  # (B, T, sum of widths), (B, P) or None
    cond = make_cond(context, pooled, sizes, sdxl=..., drop_sizes=...)

Text goes through each tower's own tokenizer, truncated to its context (77 tokens), without the web-UI
emphasis syntax: parentheses in a training caption are words, not weights. The towers' hidden states are
concatenated along features, the pooled vector comes from the one tower that returns it (as
``ldm.bundle.Bundle.encode_prompts``).

SDXL's vector (Podell et al. 2023, sec. 2.2; sgm's ConcatTimestepEmbedderND): the pooled text vector followed by
the sinusoidal embeddings (256 features each, ldm.unet_blocks.timestep_embedding) of original size (h, w), crop
top-left (top, left) and target size (h, w), in that order: (B, P + 6 * 256).

Randomness per sample: every random draw of a training sample (VAE posterior, timestep and noise, dropout) comes
from a stream keyed by (seed, epoch, dataset index, purpose). A sample's loss therefore does not depend on which
process or micro-batch it landed in, so N processes give the same steps as one process with the same global
batch, and a resumed run draws what the uninterrupted run drew.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch
from torch import Tensor, nn

from ldm.conditioning import Cond
from ldm.model_config import sdxl_size_embedding

__all__ = ["TextTowers", "drop_flags", "keyed_generators", "keyed_seed", "make_cond", "tokenize"]


class TextTowers(nn.Module):
    """The text towers as one module: per-tower token ids -> (context (B, T, sum D_i), pooled (B, P) or None)."""

    def __init__(self, towers: nn.ModuleList):
        super().__init__()
        self.towers = towers

    def forward(self, ids: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
        hidden, pooled = [], None
        for tower, tower_ids in zip(self.towers, ids):
            h, p = tower(tower_ids)  # (B, T, D_i), (B, P) or None
            hidden.append(h)
            pooled = p if p is not None else pooled
        return torch.cat(hidden, dim=-1), pooled


def tokenize(towers: TextTowers | nn.ModuleList, texts: Sequence[str], device: torch.device | str) -> list[Tensor]:
    """Per tower, (B, T) token ids on ``device``."""
    module_list = towers.towers if isinstance(towers, TextTowers) else towers
    return [tower.tokenize(list(texts)).to(device) for tower in module_list]


class TokenCache:
    """Token ids per distinct caption, computed once: the BPE tokenizer costs about 0.1 ms a caption, which at a
    few hundred captions a step is a large part of a small model's step. Cleared when it holds ``max_items``."""

    def __init__(self, towers: TextTowers | nn.ModuleList, max_items: int = 200_000):
        self.towers, self.max_items = towers, max_items
        self.ids: dict[str, list[Tensor]] = {}

    def __call__(self, texts: Sequence[str], device: torch.device | str) -> list[Tensor]:
        """Per tower, (B, T) token ids on ``device``; equal to ``tokenize(towers, texts, device)``."""
        new = [t for t in dict.fromkeys(texts) if t not in self.ids]
        if new:
            if len(self.ids) + len(new) > self.max_items:
                self.ids.clear()
                new = list(dict.fromkeys(texts))
            for t in new:
                self.ids[t] = []
            for ids in tokenize(self.towers, new, "cpu"):  # per tower (N, T)
                for i, t in enumerate(new):
                    self.ids[t].append(ids[i])
        n_towers = len(next(iter(self.ids.values())))
        return [torch.stack([self.ids[t][k] for t in texts]).to(device) for k in range(n_towers)]


def make_cond(context: Tensor, pooled: Tensor | None, sizes: Tensor | None, *, sdxl: bool,
              drop_sizes: Tensor | None = None) -> Cond:  # fmt: skip
    """The U-Net's Cond. SDXL: vector = [pooled, size embedding], the latter zeroed where ``drop_sizes`` (B,)."""
    if not sdxl:
        return Cond(context=context)
    if pooled is None or sizes is None:
        raise ValueError("SDXL conditioning needs the pooled text vector and the image sizes")
    emb = sdxl_size_embedding(sizes.to(pooled.device)).to(pooled.dtype)  # (B, 1536)
    if drop_sizes is not None:
        emb = emb * (~drop_sizes.to(emb.device))[:, None].to(emb.dtype)
    return Cond(context=context, vector=torch.cat([pooled, emb], dim=-1))


def batch_sizes(batch: dict) -> Tensor:
    """(B, 6) long: original_size, crop_coords, target_size of a collated batch."""
    return torch.cat([batch["original_size"], batch["crop_coords"], batch["target_size"]], dim=1)


# ------------------------------------------------------------------------------------------- randomness


def keyed_seed(*key: object) -> int:
    """A 63-bit seed from a key such as (seed, epoch, index, "noise"): stable across processes and runs."""
    digest = hashlib.blake2b("/".join(map(str, key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def keyed_generators(seed: int, epoch: int, indices: Sequence[int], purpose: str,
                     device: torch.device | str) -> list[torch.Generator]:  # fmt: skip
    """One generator per sample on ``device``, seeded from (seed, epoch, index, purpose)."""
    return [torch.Generator(device=device).manual_seed(keyed_seed(seed, epoch, int(i), purpose)) for i in indices]


def drop_flags(prob: float, seed: int, epoch: int, indices: Sequence[int], purpose: str) -> Tensor:
    """(B,) bool: which samples drop the condition ``purpose``, each with probability ``prob``."""
    if prob <= 0:
        return torch.zeros(len(indices), dtype=torch.bool)
    u = [keyed_seed(seed, epoch, int(i), "drop", purpose) / 2**63 for i in indices]  # uniform in [0, 1)
    return torch.tensor([v < prob for v in u], dtype=torch.bool)
