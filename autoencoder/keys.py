"""Checkpoint layouts of the KL autoencoder: explicit key maps, both directions.

Our parameter names ARE the original LDM layout (see blocks.py), so an original single-file checkpoint
only needs its ``first_stage_model.`` prefix stripped (``original_to_ours``). The diffusers
``AutoencoderKL`` layout differs in names and in two structural points, handled by ``key_pairs``:

    ours (original LDM)                            diffusers AutoencoderKL
    encoder.down.{i}.block.{j}.nin_shortcut        encoder.down_blocks.{i}.resnets.{j}.conv_shortcut
    encoder.down.{i}.downsample.conv               encoder.down_blocks.{i}.downsamplers.0.conv
    {en,de}coder.mid.block_{1,2}                   {en,de}coder.mid_block.resnets.{0,1}
    {en,de}coder.mid.attn_1.norm                   {en,de}coder.mid_block.attentions.0.group_norm
    {en,de}coder.mid.attn_1.{q,k,v,proj_out}       ....attentions.0.{to_q,to_k,to_v,to_out.0}
        weights (C, C, 1, 1): 1x1 convolutions         weights (C, C): Linear            <- reshaped
    {en,de}coder.norm_out                          {en,de}coder.conv_norm_out
    decoder.up.{L-1-i}.block.{j}                   decoder.up_blocks.{i}.resnets.{j}   <- index reversed:
    decoder.up.{L-1-i}.upsample.conv               decoder.up_blocks.{i}.upsamplers.0.conv
                                                   the original indexes up levels by resolution, diffusers
                                                   in the order they are applied
    conv_in, conv_out, quant_conv, post_quant_conv, norm1/conv1/norm2/conv2: same names

Old diffusers checkpoints name the attention tensors query/key/value/proj_attn; ``diffusers_to_ours``
accepts those too. Conversions return views of the input tensors (reshaped where needed): no copies.
"""
from __future__ import annotations

from torch import Tensor

from ldm.vae_config import AutoencoderConfig

ATTN_PROJ = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}  # ours -> diffusers
DEPRECATED_DIFFUSERS_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
RESNET_LAYERS = ("norm1", "conv1", "norm2", "conv2")
NON_VAE_PREFIXES = ("loss.", "model_ema.")  # in VAE-only training checkpoints (discriminator, EMA bookkeeping)


def key_pairs(config: AutoencoderConfig) -> list[tuple[str, str]]:
    """(our key, diffusers key) for every tensor of an AutoencoderKL with this config."""
    c = config
    if c.channel_mult[0] != 1:
        raise ValueError(f"the diffusers layout needs channel_mult[0] == 1, got channel_mult={c.channel_mult}")
    L, widths = len(c.channel_mult), [c.base_channels * m for m in c.channel_mult]
    modules: list[tuple[str, str]] = []  # (our module, diffusers module); each has .weight and .bias

    def resnet(ours: str, theirs: str, c_in: int, c_out: int) -> None:
        modules.extend((f"{ours}.{n}", f"{theirs}.{n}") for n in RESNET_LAYERS)
        if c_in != c_out:
            modules.append((f"{ours}.nin_shortcut", f"{theirs}.conv_shortcut"))

    def mid(part: str) -> None:
        resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", widths[-1], widths[-1])
        modules.append((f"{part}.mid.attn_1.norm", f"{part}.mid_block.attentions.0.group_norm"))
        modules.extend((f"{part}.mid.attn_1.{o}", f"{part}.mid_block.attentions.0.{d}") for o, d in ATTN_PROJ.items())
        resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", widths[-1], widths[-1])

    modules.append(("encoder.conv_in", "encoder.conv_in"))
    c_in = c.base_channels
    for i in range(L):
        for j in range(c.num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", c_in, widths[i])
            c_in = widths[i]
        if i != L - 1:
            modules.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv"))
    mid("encoder")
    modules += [("encoder.norm_out", "encoder.conv_norm_out"), ("encoder.conv_out", "encoder.conv_out")]
    if c.use_quant_conv:
        modules += [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]

    modules.append(("decoder.conv_in", "decoder.conv_in"))
    mid("decoder")
    c_in = widths[-1]
    for i in range(L):  # diffusers' application order; our level index runs the other way
        level = L - 1 - i
        for j in range(c.num_res_blocks + 1):
            resnet(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", c_in, widths[level])
            c_in = widths[level]
        if level != 0:
            modules.append((f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv"))
    modules += [("decoder.norm_out", "decoder.conv_norm_out"), ("decoder.conv_out", "decoder.conv_out")]

    return [(f"{o}.{p}", f"{d}.{p}") for o, d in modules for p in ("weight", "bias")]


def diffusers_to_ours(state_dict: dict[str, Tensor], config: AutoencoderConfig) -> dict[str, Tensor]:
    """A diffusers AutoencoderKL state dict -> our (original LDM) layout. Every key must be mapped."""
    renamed = {_undeprecate(k): v for k, v in state_dict.items()}
    return _convert(renamed, {d: o for o, d in key_pairs(config)}, to_conv=True, source="diffusers")


def ours_to_diffusers(state_dict: dict[str, Tensor], config: AutoencoderConfig) -> dict[str, Tensor]:
    """Our (original LDM) layout -> a diffusers AutoencoderKL state dict. Every key must be mapped."""
    return _convert(state_dict, dict(key_pairs(config)), to_conv=False, source="ours")


def original_to_ours(state_dict: dict[str, Tensor], prefix: str = "first_stage_model.") -> dict[str, Tensor]:
    """An original LDM checkpoint (full model with ``prefix``, or a VAE-only file with prefix "") -> ours.

    Keeps the keys under ``prefix`` (all keys if prefix is ""), drops the training-only ``loss.*`` /
    ``model_ema.*`` entries, and reshapes (C, C) attention projections, found in some re-saved files, to
    the (C, C, 1, 1) convolution layout. Load the result with ``load_state_dict(..., strict=True)``.
    """
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix) :]
        if key.startswith(NON_VAE_PREFIXES):
            continue
        if _is_attn_proj_weight(key) and value.ndim == 2:
            value = value[:, :, None, None]
        out[key] = value
    if not out:
        raise ValueError(f"no autoencoder keys under prefix {prefix!r} in this checkpoint")
    return out


def config_from_diffusers(d: dict) -> AutoencoderConfig:
    """An AutoencoderConfig from a diffusers AutoencoderKL config (its config.json as a dict)."""
    channels = tuple(d.get("block_out_channels", (64,)))
    down = tuple(d.get("down_block_types", ("DownEncoderBlock2D",)))
    up = tuple(d.get("up_block_types", ("UpDecoderBlock2D",)))
    base = channels[0]
    problems = []
    if any(ch % base for ch in channels):
        problems.append(f"block_out_channels {channels} are not multiples of the first")
    same_levels = len(down) == len(up) == len(channels)
    if set(down) != {"DownEncoderBlock2D"} or set(up) != {"UpDecoderBlock2D"} or not same_levels:
        problems.append(f"block types must be DownEncoderBlock2D / UpDecoderBlock2D, one per level, got {down} / {up}")
    if d.get("act_fn", "silu") != "silu":
        problems.append(f"act_fn must be silu, got {d.get('act_fn')!r}")
    if not d.get("mid_block_add_attention", True):
        problems.append("mid_block_add_attention=False is not supported")
    if bool(d.get("use_quant_conv", True)) != bool(d.get("use_post_quant_conv", True)):
        problems.append("use_quant_conv and use_post_quant_conv must agree")
    if problems:
        raise ValueError("unsupported diffusers AutoencoderKL config: " + "; ".join(problems))
    return AutoencoderConfig(
        in_channels=d.get("in_channels", 3),
        out_channels=d.get("out_channels", 3),
        latent_channels=d.get("latent_channels", 4),
        base_channels=base,
        channel_mult=tuple(ch // base for ch in channels),
        num_res_blocks=d.get("layers_per_block", 1),
        norm_num_groups=d.get("norm_num_groups", 32),
        scale_factor=d.get("scaling_factor", 0.18215),
        shift_factor=d.get("shift_factor") or 0.0,
        use_quant_conv=bool(d.get("use_quant_conv", True)),
    )


def config_to_diffusers(config: AutoencoderConfig) -> dict:
    """Keyword arguments for diffusers' ``AutoencoderKL(**kwargs)`` describing the same network."""
    c, L = config, len(config.channel_mult)
    if c.channel_mult[0] != 1:
        raise ValueError(f"the diffusers layout needs channel_mult[0] == 1, got channel_mult={c.channel_mult}")
    return dict(
        in_channels=c.in_channels,
        out_channels=c.out_channels,
        down_block_types=["DownEncoderBlock2D"] * L,
        up_block_types=["UpDecoderBlock2D"] * L,
        block_out_channels=[c.base_channels * m for m in c.channel_mult],
        layers_per_block=c.num_res_blocks,
        act_fn="silu",
        latent_channels=c.latent_channels,
        norm_num_groups=c.norm_num_groups,
        scaling_factor=c.scale_factor,
        shift_factor=c.shift_factor if c.shift_factor != 0.0 else None,
        use_quant_conv=c.use_quant_conv,
        use_post_quant_conv=c.use_quant_conv,
    )


def _convert(state_dict: dict[str, Tensor], mapping: dict[str, str], to_conv: bool, source: str) -> dict[str, Tensor]:
    missing = sorted(set(mapping) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(mapping))
    if missing or unexpected:
        raise ValueError(
            f"{source} autoencoder state dict does not match the config: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    out = {}
    for src, dst in mapping.items():
        value = state_dict[src]
        ours_key = dst if to_conv else src
        if _is_attn_proj_weight(ours_key):
            want = 2 if to_conv else 4
            if value.ndim != want:
                raise ValueError(f"{src}: expected a {want}-d attention projection weight, got {tuple(value.shape)}")
            value = value[:, :, None, None] if to_conv else value[:, :, 0, 0]  # Linear (C, C) <-> 1x1 conv (C, C, 1, 1)
        out[dst] = value
    return out


def _is_attn_proj_weight(our_key: str) -> bool:
    parts = our_key.split(".")
    return len(parts) >= 3 and parts[-3] == "attn_1" and parts[-2] in ATTN_PROJ and parts[-1] == "weight"


def _undeprecate(key: str) -> str:
    """Old diffusers attention names (query/key/value/proj_attn) -> current ones (to_q/to_k/to_v/to_out.0)."""
    head, _, tail = key.rpartition(".")  # tail: weight / bias
    block, _, name = head.rpartition(".")
    if ".attentions." in block and name in DEPRECATED_DIFFUSERS_ATTN:
        return f"{block}.{DEPRECATED_DIFFUSERS_ATTN[name]}.{tail}"
    return key
