"""State-dict key map between diffusers' ``UNet2DConditionModel`` and our U-Net (the original LDM layout).

Our names ARE the original ``openaimodel`` names, so an original single-file checkpoint needs only its
``model.diffusion_model.`` prefix stripped; diffusers is the one layout that needs translating.

The translation is a table of module prefixes computed from the config (the same block bookkeeping
as diffusers' ``convert_ldm_unet_checkpoint``, written out here), plus the renames inside a ResBlock.
Below a SpatialTransformer / Transformer2DModel both layouts use the same names. With
``n = num_res_blocks``, L levels, level l and up block u = L-1-l:

    ours                                   diffusers
    time_embed.0 / .2                      time_embedding.linear_1 / linear_2
    label_emb.0.0 / .0.2                   add_embedding.linear_1 / linear_2        (SDXL's vector)
    input_blocks.0.0                       conv_in
    input_blocks.{1 + l(n+1) + j}.0 / .1   down_blocks.{l}.resnets.{j} / attentions.{j}
    input_blocks.{1 + l(n+1) + n}.0.op     down_blocks.{l}.downsamplers.0.conv
    middle_block.0 / .1 / .2               mid_block.resnets.0 / attentions.0 / resnets.1
    output_blocks.{u(n+1) + j}.0 / .1      up_blocks.{u}.resnets.{j} / attentions.{j}
    output_blocks.{u(n+1) + n}.{1|2}.conv  up_blocks.{u}.upsamplers.0.conv          (.2 after an attention)
    out.0 / out.2                          conv_norm_out / conv_out
"""
from __future__ import annotations

from typing import Mapping

from torch import Tensor

from .unet import UNetConfig

# Inside a ResBlock (ours) / ResnetBlock2D (diffusers).
RESNET_NAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_RESNET_NAMES_BACK = {v: k for k, v in RESNET_NAMES.items()}


def module_map(cfg: UNetConfig) -> list[tuple[str, str, bool]]:
    """(our module prefix, diffusers module prefix, is_resnet) for every module that holds parameters."""
    n, L = cfg.num_res_blocks, len(cfg.channel_mult)
    pairs = [
        ("time_embed.0", "time_embedding.linear_1", False),
        ("time_embed.2", "time_embedding.linear_2", False),
        ("input_blocks.0.0", "conv_in", False),
        ("out.0", "conv_norm_out", False),
        ("out.2", "conv_out", False),
    ]
    if cfg.adm_in_channels:
        pairs += [
            ("label_emb.0.0", "add_embedding.linear_1", False),
            ("label_emb.0.2", "add_embedding.linear_2", False),
        ]

    for level in range(L):  # down
        for j in range(n):
            i = 1 + level * (n + 1) + j
            pairs.append((f"input_blocks.{i}.0", f"down_blocks.{level}.resnets.{j}", True))
            if cfg.transformer_depth[level]:
                pairs.append((f"input_blocks.{i}.1", f"down_blocks.{level}.attentions.{j}", False))
        if level != L - 1:
            i = 1 + level * (n + 1) + n
            pairs.append((f"input_blocks.{i}.0.op", f"down_blocks.{level}.downsamplers.0.conv", False))

    pairs += [
        ("middle_block.0", "mid_block.resnets.0", True),
        ("middle_block.1", "mid_block.attentions.0", False),
        ("middle_block.2", "mid_block.resnets.1", True),
    ]

    for u in range(L):  # up, from the lowest level
        level = L - 1 - u
        attn = cfg.transformer_depth[level] > 0
        for j in range(n + 1):
            i = u * (n + 1) + j
            pairs.append((f"output_blocks.{i}.0", f"up_blocks.{u}.resnets.{j}", True))
            if attn:
                pairs.append((f"output_blocks.{i}.1", f"up_blocks.{u}.attentions.{j}", False))
        if level != 0:
            i = u * (n + 1) + n
            pairs.append((f"output_blocks.{i}.{2 if attn else 1}.conv", f"up_blocks.{u}.upsamplers.0.conv", False))
    return pairs


def diffusers_to_ours(sd: Mapping[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict -> ours (the original layout); tensors are shared."""
    table = {theirs: (ours, resnet) for ours, theirs, resnet in module_map(cfg)}
    return _convert(sd, table, _RESNET_NAMES_BACK, "diffusers")


def ours_to_diffusers(sd: Mapping[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    """Our (original-layout) state dict -> diffusers ``UNet2DConditionModel``; tensors are shared."""
    table = {ours: (theirs, resnet) for ours, theirs, resnet in module_map(cfg)}
    return _convert(sd, table, RESNET_NAMES, "ours")


def _convert(sd: Mapping[str, Tensor], table: dict, resnet_names: dict[str, str], side: str) -> dict[str, Tensor]:
    out, unknown = {}, []
    for key, value in sd.items():
        new = _convert_key(key, table, resnet_names)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" ... ({len(unknown)} in all)" if len(unknown) > 8 else "")
        raise ValueError(f"sd: keys not in the {side} U-Net layout for this UNetConfig: {shown}")
    return out


def _convert_key(key: str, table: dict, resnet_names: dict[str, str]) -> str | None:
    parts = key.split(".")
    for k in range(len(parts) - 1, 0, -1):  # longest module prefix first
        prefix = ".".join(parts[:k])
        if prefix in table:
            target, resnet = table[prefix]
            rest = ".".join(parts[k:])  # e.g. "weight", "in_layers.0.bias", "transformer_blocks.0.attn1.to_q.weight"
            if resnet:
                module, _, param = rest.rpartition(".")
                if module not in resnet_names:
                    return None
                rest = f"{resnet_names[module]}.{param}"
            return f"{target}.{rest}"
    return None
