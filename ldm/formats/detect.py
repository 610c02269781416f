"""Which format a path holds, which layout an original single file uses, and its config read from tensor shapes.

Formats (by their files, nothing is read):
    original   a ``.safetensors`` file (or a weights-only ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin`` pickle)
    diffusers  a folder with ``model_index.json`` or ``unet/config.json``
    ldm        a folder with ``model.safetensors`` and ``config.yaml`` (ours)

Original single-file layouts (``ORIGINAL_LAYOUTS``), told apart by their key prefixes:
    U-Net ``model.diffusion_model.*`` and VAE ``first_stage_model.*`` in every family, plus the text towers
        sd1   ``cond_stage_model.transformer.*``            OpenAI CLIP in transformers' layout ("hf")
        sd2   ``cond_stage_model.model.*``                  OpenCLIP in open_clip's layout ("open_clip")
        sdxl  ``conditioner.embedders.0.transformer.*``     CLIP ViT-L ("hf")
              ``conditioner.embedders.1.model.*``           OpenCLIP bigG ("open_clip")
    Other SGM embedder sets (e.g. the SDXL refiner's single bigG) are read as family "custom".

Config from shapes: widths, levels, block counts, transformer depths, context and vector widths, linear vs conv
projections, latent channels and tower sizes are all in the tensor shapes. Head counts and GroupNorm groups are
not: they follow the family's convention (U-Net: 8 heads in SD 1.x, 64-wide heads in SD 2.x / XL; text towers:
64-wide heads; 32 groups), and where a convention does not divide the widths (tiny test models) the key is
reported as unknown so that the caller must pass it in ``config_overrides``.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from ..checkpoint import PICKLE_SUFFIXES, CheckpointError
from ..model_config import ModelConfig
from ..text_config import PAD_OPENAI, TextEncoderConfig
from ..unet import UNetConfig
from ..vae_config import AutoencoderConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT = ("cond_stage_model.transformer.", "hf")
SD2_TEXT = ("cond_stage_model.model.", "open_clip")
SGM_EMBEDDER = re.compile(r"^conditioner\.embedders\.(\d+)\.(transformer|model)\.")
SGM_LAYOUTS = {"transformer": "hf", "model": "open_clip"}
VAE_SCALE = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}

ORIGINAL_LAYOUTS = (
    "sd1: model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.* (OpenAI CLIP, transformers names)",
    "sd2: model.diffusion_model.*, first_stage_model.*, cond_stage_model.model.* (OpenCLIP, open_clip names)",
    "sdxl: model.diffusion_model.*, first_stage_model.*, conditioner.embedders.0.transformer.* (CLIP ViT-L) + "
    "conditioner.embedders.1.model.* (OpenCLIP bigG)",
)
FOLDER_LAYOUTS = (
    "diffusers folder: model_index.json or unet/config.json, with unet/, vae/, text_encoder/ [text_encoder_2/]",
    "ldm folder: model.safetensors + config.yaml",
)


def known_layouts() -> str:
    return "; ".join(ORIGINAL_LAYOUTS + FOLDER_LAYOUTS)


# ----------------------------------------------------------------------------------------------- format


def detect_format(path: str | Path) -> str:
    """"original" | "diffusers" | "ldm" from the files at ``path``; CheckpointError naming the path otherwise."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix == ".safetensors" or path.suffix in PICKLE_SUFFIXES:
            return "original"
        raise CheckpointError(
            f"{path}: unknown checkpoint file type {path.suffix!r}; expected .safetensors (or a weights-only "
            f"{' / '.join(PICKLE_SUFFIXES)}) or a folder. Known layouts: {known_layouts()}"
        )
    if (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file():
        return "diffusers"
    has_weights, has_config = (path / "model.safetensors").is_file(), (path / "config.yaml").is_file()
    if has_weights and has_config:
        return "ldm"
    if has_weights or has_config:
        missing = "config.yaml" if has_weights else "model.safetensors"
        raise CheckpointError(f"{path}: incomplete ldm model folder, {missing} is missing")
    raise CheckpointError(f"{path}: not a model folder (no model_index.json, unet/config.json or model.safetensors + "
                          f"config.yaml). Known layouts: {known_layouts()}")  # fmt: skip


# ------------------------------------------------------------------------------------- original layout


@dataclass
class OriginalLayout:
    family: str  # detected from the prefixes: sd1 | sd2 | sdxl | custom
    towers: list[tuple[str, str]]  # (key prefix, "hf" | "open_clip") per text tower, in order


def original_layout(keys, source: str) -> OriginalLayout:
    """The family and text-tower prefixes of an original single file, from its key names."""
    keys = list(keys)
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        shown = ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else "") if keys else "no tensors at all"
        raise CheckpointError(f"{source}: not a Stable Diffusion checkpoint: no {UNET_PREFIX}* keys (found: {shown}). "
                              f"Known layouts: {known_layouts()}")  # fmt: skip
    embedders = {}
    for k in keys:
        if m := SGM_EMBEDDER.match(k):
            embedders[int(m.group(1))] = (m.group(0), SGM_LAYOUTS[m.group(2)])
    if embedders:
        towers = [embedders[i] for i in sorted(embedders)]
        family = "sdxl" if [t[1] for t in towers] == ["hf", "open_clip"] else "custom"
        return OriginalLayout(family, towers)
    for prefix, layout, family in (SD1_TEXT + ("sd1",), SD2_TEXT + ("sd2",)):
        if any(k.startswith(prefix) for k in keys):
            return OriginalLayout(family, [(prefix, layout)])
    raise CheckpointError(f"{source}: no text encoder weights (cond_stage_model.* or conditioner.embedders.*). "
                          f"Known layouts: {known_layouts()}")  # fmt: skip


def writing_layout(cfg_family: str, text: list[TextEncoderConfig]) -> list[tuple[str, str]]:
    """(key prefix, layout) per text tower when writing an original file: the family's own; "custom" models use
    cond_stage_model for one plain tower, SGM embedders otherwise, OpenAI towers (padded with 49407) in the
    transformers layout and OpenCLIP towers (padded with 0) in open_clip's."""
    if cfg_family == "sd1":
        return [SD1_TEXT]
    if cfg_family == "sd2":
        return [SD2_TEXT]
    if cfg_family == "sdxl":
        return [("conditioner.embedders.0.transformer.", "hf"), ("conditioner.embedders.1.model.", "open_clip")]
    layouts = ["hf" if t.pad_id == PAD_OPENAI else "open_clip" for t in text]
    if cfg_family == "custom" and len(text) == 1 and not text[0].return_pooled:
        return [SD1_TEXT if layouts[0] == "hf" else SD2_TEXT]
    names = {v: k for k, v in SGM_LAYOUTS.items()}
    return [(f"conditioner.embedders.{i}.{names[lay]}.", lay) for i, lay in enumerate(layouts)]


# ---------------------------------------------------------------------------------- config from shapes


def _need(sd: dict[str, Tensor], key: str, part: str, source: str) -> Tensor:
    if key not in sd:
        raise CheckpointError(f"{source}: the {part} has no {key!r}: not a layout this library reads")
    return sd[key]


def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def unet_from_shapes(sd: dict[str, Tensor], family: str, source: str) -> tuple[dict, list[str]]:
    """UNetConfig fields from an original-layout U-Net state dict (prefix stripped), and the keys that could not be
    read (head count / GroupNorm groups where the family's convention does not divide the widths)."""
    w_in = _need(sd, "input_blocks.0.0.weight", "U-Net", source)  # (mc, in_channels, 3, 3)
    mc, c_in = int(w_in.shape[0]), int(w_in.shape[1])
    c_out = int(_need(sd, "out.2.weight", "U-Net", source).shape[0])
    blocks = _indices(sd, r"input_blocks\.(\d+)\.")
    ops = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in sd]
    n = ops[0] - 1 if ops else len(blocks) - 1  # ResBlocks per level: the first Downsample follows them
    if n < 1 or len(blocks) % (n + 1) or blocks != list(range(len(blocks))):
        raise CheckpointError(f"{source}: U-Net input_blocks {blocks[:3]}..{blocks[-3:]} do not form levels of "
                              f"ResBlocks + Downsample")  # fmt: skip
    L = len(blocks) // (n + 1)
    mult, depth = [], []
    for level in range(L):
        first = 1 + level * (n + 1)
        ch = int(_need(sd, f"input_blocks.{first}.0.out_layers.3.weight", "U-Net", source).shape[0])
        if ch % mc:
            raise CheckpointError(f"{source}: U-Net level {level} has {ch} channels, not a multiple of {mc}")
        mult.append(ch // mc)
        depths = {len(_indices(sd, rf"input_blocks\.{first + j}\.1\.transformer_blocks\.(\d+)\.")) for j in range(n)}
        if len(depths) != 1:
            raise CheckpointError(f"{source}: U-Net level {level} has ResBlocks with different transformer depths")
        depth.append(depths.pop())
    middle = len(_indices(sd, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    ctx = next((int(v.shape[1]) for k, v in sd.items() if k.endswith("attn2.to_k.weight")), None)
    proj = next((v for k, v in sd.items() if k.endswith("proj_in.weight")), None)
    if ctx is None or proj is None:
        raise CheckpointError(f"{source}: the U-Net has no cross-attention (attn2.to_k / proj_in): not a text-to-image "
                              f"U-Net this library reads")  # fmt: skip
    linear = proj.ndim == 2
    emb = _need(sd, "input_blocks.1.0.emb_layers.1.weight", "U-Net", source)  # (C or 2C, 4 mc)
    adm = int(sd["label_emb.0.0.weight"].shape[1]) if "label_emb.0.0.weight" in sd else 0
    fields = dict(
        in_channels=c_in, out_channels=c_out, model_channels=mc, channel_mult=mult, num_res_blocks=n,
        transformer_depth=depth, transformer_depth_middle=max(middle, 1), context_dim=ctx,
        use_linear_in_transformer=linear, adm_in_channels=adm,
        use_scale_shift_norm=int(emb.shape[0]) == 2 * mult[0] * mc,
    )  # fmt: skip
    head_width = family in ("sd2", "sdxl") or (family == "custom" and linear)
    fields.update(num_heads=8, num_head_channels=64 if head_width else -1)
    unknown = []
    attended = [mc * m for m, d in zip(mult, depth) if d] + [mc * mult[-1]]
    if any(ch % (64 if head_width else 8) for ch in attended):
        unknown.append("unet.num_head_channels" if head_width else "unet.num_heads")
    if any(mc * m % 32 for m in mult):
        unknown.append("unet.norm_groups")
    defaults = dataclasses.asdict(UNetConfig())
    return {**defaults, **fields}, unknown


def vae_from_shapes(sd: dict[str, Tensor], family: str, source: str, sgm: bool = False) -> tuple[dict, list[str]]:
    """AutoencoderConfig fields from an original-layout VAE state dict (prefix stripped) + unreadable keys. The
    latent scale follows the family (a "custom" SGM model, e.g. the SDXL refiner, takes SDXL's)."""
    w_in = _need(sd, "encoder.conv_in.weight", "VAE", source)  # (ch, in_channels, 3, 3)
    base, c_in = int(w_in.shape[0]), int(w_in.shape[1])
    levels = _indices(sd, r"encoder\.down\.(\d+)\.")
    if not levels:
        raise CheckpointError(f"{source}: the VAE has no encoder.down.* blocks")
    mult = [int(_need(sd, f"encoder.down.{i}.block.0.conv2.weight", "VAE", source).shape[0]) // base for i in levels]
    fields = dict(
        in_channels=c_in,
        out_channels=int(_need(sd, "decoder.conv_out.weight", "VAE", source).shape[0]),
        latent_channels=int(_need(sd, "decoder.conv_in.weight", "VAE", source).shape[1]),
        base_channels=base,
        channel_mult=mult,
        num_res_blocks=len(_indices(sd, r"encoder\.down\.0\.block\.(\d+)\.")),
        scale_factor=VAE_SCALE.get(family, VAE_SCALE["sdxl" if sgm else "sd1"]),
        use_quant_conv="quant_conv.weight" in sd,
    )
    unknown = ["vae.norm_num_groups"] if any(base * m % 32 for m in mult) else []
    return {**AutoencoderConfig().to_dict(), **fields}, unknown


def text_from_shapes(sd: dict[str, Tensor], layout: str, preset: TextEncoderConfig, index: int,
                     source: str) -> tuple[dict, list[str]]:  # fmt: skip
    """TextEncoderConfig fields of a tower (keys without the file's prefix) in layout "hf" or "open_clip": sizes
    from shapes, the reading of the tower (layer, final norm, pooled, padding, activation) from ``preset``."""
    part = f"text tower {index}"
    if layout == "hf":
        pre = "text_model." if any(k.startswith("text_model.") for k in sd) else ""
        tok = _need(sd, f"{pre}embeddings.token_embedding.weight", part, source)  # (V, D)
        pos = _need(sd, f"{pre}embeddings.position_embedding.weight", part, source)  # (T, D)
        layers = len(_indices(sd, rf"{re.escape(pre)}encoder\.layers\.(\d+)\."))
        fc = sd.get(f"{pre}encoder.layers.0.mlp.fc1.weight")  # (4D, D)
        proj = int(sd["text_projection.weight"].shape[0]) if "text_projection.weight" in sd else None  # (P, D)
    else:
        tok = _need(sd, "token_embedding.weight", part, source)
        pos = _need(sd, "positional_embedding", part, source)
        layers = len(_indices(sd, r"transformer\.resblocks\.(\d+)\."))
        fc = sd.get("transformer.resblocks.0.mlp.c_fc.weight")
        proj = int(sd["text_projection"].shape[1]) if "text_projection" in sd else None  # (D, P)
    width = int(tok.shape[1])
    if fc is not None and int(fc.shape[0]) != 4 * width:
        raise CheckpointError(f"{source}: {part} has an MLP of width {fc.shape[0]}, expected 4 x {width}")
    fields = dict(
        width=width, layers=layers, heads=max(width // 64, 1), projection_dim=proj,
        vocab_size=int(tok.shape[0]), context_length=int(pos.shape[0]),
    )  # fmt: skip
    unknown = [f"text[{index}].heads"] if width % 64 else []
    return {**dataclasses.asdict(preset), **fields}, unknown


def tower_presets(family: str, layout: OriginalLayout, has_vector: bool) -> list[TextEncoderConfig]:
    """How each tower of the file is read: the family's presets, or for "custom" by layout and position (OpenAI
    towers as SD 1.x / SDXL CLIP-L, OpenCLIP towers as SD 2.x / SDXL bigG; the last OpenCLIP tower of an SGM
    model with a vector condition gives the pooled vector)."""
    if family != "custom":
        return list(ModelConfig.preset(family).text)
    sgm = layout.towers[0][0].startswith("conditioner.")
    last_open_clip = max((i for i, (_, lay) in enumerate(layout.towers) if lay == "open_clip"), default=None)
    out = []
    for i, (_, lay) in enumerate(layout.towers):
        if not sgm:
            out.append(TextEncoderConfig.sd1() if lay == "hf" else TextEncoderConfig.sd2())
        elif lay == "hf":
            out.append(TextEncoderConfig.sdxl_clip_l())
        else:
            out.append(dataclasses.replace(TextEncoderConfig.sdxl_bigg(), return_pooled=has_vector and i == last_open_clip))
    return out
