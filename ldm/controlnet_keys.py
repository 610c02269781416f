"""ControlNet weights: the original cldm layout and diffusers' ``ControlNetModel`` layout <-> ours.

Ours IS the original layout without its ``control_model.`` prefix (cldm/cldm.py names, as in
control_sd15_*.safetensors and control_v11*.safetensors; some re-distributed files, e.g. for SD 2.x, already
lack the prefix). diffusers' ControlNetModel names its encoder as UNet2DConditionModel does (translated by
ldm/unet_keys.py: ``conv_in``, ``time_embedding``, ``down_blocks``, ``mid_block`` ...) and its own layers so,
for hint encoder widths c_0 .. c_{K-1}:

    ours                                  diffusers
    input_hint_block.0                    controlnet_cond_embedding.conv_in
    input_hint_block.{2m}, m = 1..2K-2    controlnet_cond_embedding.blocks.{m-1}
    input_hint_block.{4K-2}               controlnet_cond_embedding.conv_out         (14 for K = 4)
    zero_convs.{i}.0                      controlnet_down_blocks.{i}
    middle_block_out.0                    controlnet_mid_block

Files are read from safetensors only (``read_controlnet``); the layout is told apart by its keys.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from torch import Tensor

from . import unet_keys
from .checkpoint import CheckpointError, read_state_dict
from .components import unet_config_from_diffusers
from .controlnet import ENCODER_MODULES, ControlNetConfig

ORIGINAL_PREFIX = "control_model."
LAYOUTS = ("original", "diffusers", "ours")

StateDict = dict[str, Tensor]


def control_module_map(cfg: ControlNetConfig) -> list[tuple[str, str]]:
    """(our module, diffusers module) for the ControlNet's own layers (the encoder's are unet_keys.module_map's)."""
    K = len(cfg.hint_block_channels)
    pairs = [("input_hint_block.0", "controlnet_cond_embedding.conv_in")]
    pairs += [(f"input_hint_block.{2 * m}", f"controlnet_cond_embedding.blocks.{m - 1}") for m in range(1, 2 * K - 1)]
    pairs.append((f"input_hint_block.{4 * K - 2}", "controlnet_cond_embedding.conv_out"))
    n_skips = len(cfg.channel_mult) * (cfg.num_res_blocks + 1)  # input blocks: conv_in + n per level + L-1 downsamples
    pairs += [(f"zero_convs.{i}.0", f"controlnet_down_blocks.{i}") for i in range(n_skips)]
    pairs.append(("middle_block_out.0", "controlnet_mid_block"))
    return pairs


def diffusers_to_ours(sd: Mapping[str, Tensor], cfg: ControlNetConfig) -> StateDict:
    """A diffusers ``ControlNetModel`` state dict -> ours (the original layout, no prefix); tensors are shared."""
    table = {theirs: ours for ours, theirs in control_module_map(cfg)}
    return _convert(sd, cfg, table, unet_keys.diffusers_to_ours, "diffusers")


def ours_to_diffusers(sd: Mapping[str, Tensor], cfg: ControlNetConfig) -> StateDict:
    """Our state dict -> diffusers ``ControlNetModel``; tensors are shared."""
    table = dict(control_module_map(cfg))
    return _convert(sd, cfg, table, unet_keys.ours_to_diffusers, "ours")


def _convert(sd, cfg, table: dict[str, str], encoder_map, side: str) -> StateDict:
    own, encoder = {}, {}
    for key, value in sd.items():
        module, _, param = key.rpartition(".")
        if module in table:
            own[f"{table[module]}.{param}"] = value
        else:
            encoder[key] = value
    out = encoder_map(encoder, cfg)  # raises on keys of neither layout
    ours = out if side == "diffusers" else encoder
    decoder = [k for k in ours if k.split(".")[0] not in ENCODER_MODULES]
    if decoder:
        shown = ", ".join(decoder[:8]) + (f" ... ({len(decoder)} in all)" if len(decoder) > 8 else "")
        raise ValueError(f"sd: keys of the U-Net's up half are no part of a ControlNet: {shown}")
    return {**out, **own}


def original_to_ours(sd: Mapping[str, Tensor], *, drop_others: bool = False) -> StateDict:
    """Original ``control_model.*`` keys -> ours (prefix stripped). Other keys (a full cldm training checkpoint also
    holds the U-Net, VAE and text tower) raise unless ``drop_others``."""
    others = [k for k in sd if not k.startswith(ORIGINAL_PREFIX)]
    if others and not drop_others:
        shown = ", ".join(others[:8]) + (f" ... ({len(others)} in all)" if len(others) > 8 else "")
        raise ValueError(f"sd: keys outside {ORIGINAL_PREFIX}* in an original ControlNet state dict: {shown}")
    return {k[len(ORIGINAL_PREFIX):]: v for k, v in sd.items() if k.startswith(ORIGINAL_PREFIX)}


def ours_to_original(sd: Mapping[str, Tensor]) -> StateDict:
    return {ORIGINAL_PREFIX + k: v for k, v in sd.items()}


def detect_layout(keys) -> str:
    """"original" (control_model.*), "diffusers" (controlnet_cond_embedding.*) or "ours" (input_hint_block.*)."""
    keys = list(keys)
    if any(k.startswith(ORIGINAL_PREFIX) for k in keys):
        return "original"
    if any(k.startswith("controlnet_cond_embedding.") for k in keys):
        return "diffusers"
    if any(k.startswith("input_hint_block.") for k in keys):
        return "ours"
    raise ValueError(
        "sd: not a ControlNet state dict: no control_model.*, controlnet_cond_embedding.* or input_hint_block.* keys"
    )


def to_ours(sd: Mapping[str, Tensor], cfg: ControlNetConfig) -> StateDict:
    """A ControlNet state dict in any of LAYOUTS -> ours."""
    layout = detect_layout(sd.keys())
    if layout == "original":
        return original_to_ours(sd)
    if layout == "diffusers":
        return diffusers_to_ours(sd, cfg)
    return dict(sd)


def read_controlnet(path: str | os.PathLike, cfg: ControlNetConfig) -> StateDict:
    """Our state dict from a ControlNet ``.safetensors`` file in the original or diffusers layout (a diffusers
    folder's diffusion_pytorch_model.safetensors; its config.json goes through ``config_from_diffusers``).
    Pickled files (.pth / .ckpt) are refused: convert them to safetensors with a tool you trust."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: ControlNet weights are read from .safetensors files only, got {path.suffix!r}")
    sd = read_state_dict(path)
    try:
        return to_ours(sd, cfg)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def config_from_diffusers(d: Mapping) -> dict:
    """A diffusers ``ControlNetModel`` config.json -> ControlNetConfig fields (plain data)."""
    d = dict(d)
    order = d.pop("controlnet_conditioning_channel_order", "rgb")
    if order != "rgb":
        raise ValueError(f"unsupported diffusers ControlNetModel config: controlnet_conditioning_channel_order="
                         f"{order!r} (supported: 'rgb'; flip the hint's channels instead)")  # fmt: skip
    control = dict(
        hint_channels=d.pop("conditioning_channels", 3),
        hint_block_channels=list(d.pop("conditioning_embedding_out_channels", None) or (16, 32, 96, 256)),
        global_pool=bool(d.pop("global_pool_conditions", False)),
    )
    d.pop("addition_embed_type_num_heads", None)  # used only by addition_embed_type="text", refused below
    # The copy has no up half: mirror the down blocks so that the U-Net's translation accepts the config.
    down = d.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    d["up_block_types"] = [b.replace("Down", "Up") for b in reversed(down)]
    d.setdefault("out_channels", d.get("in_channels", 4))
    return {**unet_config_from_diffusers(d), **control}
