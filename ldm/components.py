"""Registry of the networks a model bundle is made of, so that ``ldm`` can build and key-map them without
importing the packages that define them (ARCHITECTURE.md: ``ldm`` imports nothing of ours).

A ``ComponentSpec`` bundles, for one kind of network, everything the checkpoint formats need:

    build(cfg) -> nn.Module                 called under ``torch.device("meta")`` by ldm/bundle.py
    from_diffusers(sd, cfg) / to_diffusers   diffusers / transformers state dict <-> ours
    from_original[layout](sd, cfg) / to_original[layout]
                                             the original single-file layout(s), keys without the file's prefix
                                             ("ldm" for U-Net and VAE; "hf" and "open_clip" for text towers)
    config_to_diffusers(cfg) -> dict         the config.json of the diffusers / transformers model
    config_from_diffusers(d) -> dict         config.json -> our config's fields (plain data, overridable)

Registered names: ``unet`` (here, below), ``vae`` (autoencoder/component.py) and ``text`` (one CLIP text tower,
text_encoder/component.py); those packages register on import, and ``inference`` / ``training`` import them.

The U-Net's diffusers config translation lives here with its registration, next to ldm/unet_keys.py's key map.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import Tensor, nn

from .unet import UNet, UNetConfig
from .unet_keys import diffusers_to_ours as unet_diffusers_to_ours
from .unet_keys import ours_to_diffusers as unet_ours_to_diffusers

StateDict = dict[str, Tensor]
KeyMap = Callable[[StateDict, Any], StateDict]

# which package registers a component (for the error message when it has not been imported)
PROVIDERS = {"unet": "ldm", "vae": "autoencoder", "text": "text_encoder", "conditions": "ldm"}


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    build: Callable[[Any], nn.Module]
    from_diffusers: KeyMap
    to_diffusers: KeyMap
    from_original: Mapping[str, KeyMap] = field(default_factory=dict)
    to_original: Mapping[str, KeyMap] = field(default_factory=dict)
    config_to_diffusers: Callable[[Any], dict] | None = None
    config_from_diffusers: Callable[[dict], dict] | None = None

    def original_map(self, layout: str, direction: str) -> KeyMap:
        """The original-layout key map ``layout`` in ``direction`` ("from" -> ours, "to" -> original)."""
        maps = self.from_original if direction == "from" else self.to_original
        if layout not in maps:
            raise ValueError(f"component {self.name!r} has no original layout {layout!r}; known: {', '.join(maps)}")
        return maps[layout]


_REGISTRY: dict[str, ComponentSpec] = {}


def register_component(spec: ComponentSpec) -> ComponentSpec:
    """Add (or replace) the spec under ``spec.name``."""
    if not isinstance(spec, ComponentSpec):
        raise TypeError(f"register_component needs a ComponentSpec, got {type(spec).__name__}")
    _REGISTRY[spec.name] = spec
    return spec


def get_component(name: str) -> ComponentSpec:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in PROVIDERS:
        raise KeyError(
            f"component {name!r} is not registered: import {PROVIDERS[name]} (inference and training do)"
        )
    raise KeyError(f"unknown component {name!r}; known: {', '.join(sorted(set(PROVIDERS) | set(_REGISTRY)))}")


def registered() -> list[str]:
    return sorted(_REGISTRY)


# ------------------------------------------------------------------------------ the U-Net's registration


def unet_config_to_diffusers(cfg: UNetConfig) -> dict:
    """config.json of diffusers' ``UNet2DConditionModel`` describing the same network.

    Two diffusers conventions: ``attention_head_dim`` is the number of HEADS (one int for SD 1.x, one per level
    when the head width is fixed); the middle block takes the last level's ``transformer_layers_per_block``.
    """
    attn = [d > 0 for d in cfg.transformer_depth]
    last = cfg.transformer_depth[-1]
    if last and last != cfg.transformer_depth_middle:
        raise ValueError(
            f"unet: diffusers gives the middle block the last level's depth; transformer_depth[-1]={last} != "
            f"transformer_depth_middle={cfg.transformer_depth_middle} cannot be written as a diffusers config"
        )
    layers = [d if d else 1 for d in cfg.transformer_depth]
    layers[-1] = cfg.transformer_depth_middle
    channels = [cfg.model_channels * m for m in cfg.channel_mult]
    heads: int | list[int] = cfg.num_heads if cfg.num_head_channels == -1 else [cfg.heads(c)[0] for c in channels]
    d = {
        "_class_name": "UNet2DConditionModel",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "block_out_channels": channels,
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "transformer_layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "attention_head_dim": heads,
        "cross_attention_dim": cfg.context_dim,
        "use_linear_projection": cfg.use_linear_in_transformer,
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "dropout": cfg.dropout,
        "resnet_time_scale_shift": "scale_shift" if cfg.use_scale_shift_norm else "default",
        "upcast_attention": False,
    }
    if cfg.adm_in_channels:  # SDXL's vector: diffusers' "text_time" addition embedding (the same two Linears)
        d.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=cfg.adm_in_channels)  # fmt: skip
    return d


# diffusers options our U-Net does not have, with the value that means "not used"
_UNSUPPORTED = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False, "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu",
    "norm_eps": 1e-5, "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "num_attention_heads": None, "dual_cross_attention": False,
    "class_embed_type": None, "num_class_embeds": None, "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default", "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}  # fmt: skip


def unet_config_from_diffusers(d: dict) -> dict:
    """A diffusers ``UNet2DConditionModel`` config.json -> UNetConfig fields (plain data)."""
    def unused(k: str, v) -> bool:  # per-level lists of False count as False
        return d[k] == v or (v is False and isinstance(d[k], (list, tuple)) and not any(d[k]))

    problems = [f"{k}={d[k]!r} (supported: {v!r})" for k, v in _UNSUPPORTED.items() if k in d and not unused(k, v)]
    down = list(d.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))  # diffusers' defaults
    up = list(d.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
    channels = list(d.get("block_out_channels", [320, 640, 1280, 1280]))
    L = len(channels)
    if not channels or len(down) != L or len(up) != L:
        problems.append("block_out_channels / down_block_types / up_block_types must have one entry per level")
    known = {"CrossAttnDownBlock2D", "DownBlock2D"}
    if set(down) - known or set(up) - {"CrossAttnUpBlock2D", "UpBlock2D"}:
        problems.append(f"block types must be (CrossAttn)DownBlock2D / (CrossAttn)UpBlock2D, got {down} / {up}")
    attn = [b == "CrossAttnDownBlock2D" for b in down]
    if [b == "CrossAttnUpBlock2D" for b in reversed(up)] != attn:
        problems.append(f"up_block_types must mirror down_block_types, got {down} / {up}")
    mc = channels[0] if channels else 1
    if any(c % mc for c in channels):
        problems.append(f"block_out_channels {channels} must be multiples of the first")
    adm = 0
    if d.get("addition_embed_type") not in (None, "text_time"):
        problems.append(f"addition_embed_type={d['addition_embed_type']!r} (supported: None, 'text_time')")
    elif d.get("addition_embed_type") == "text_time":
        adm = d.get("projection_class_embeddings_input_dim") or 0
    per_level = lambda v: list(v) if isinstance(v, (list, tuple)) else [v] * L  # noqa: E731
    lpb = d.get("layers_per_block", 2)
    if len(set(per_level(lpb))) != 1:
        problems.append(f"layers_per_block={lpb!r}: one count for every level is supported")
    ctx = d.get("cross_attention_dim", 1280)
    if isinstance(ctx, (list, tuple)):
        problems.append(f"cross_attention_dim={ctx!r}: one width for every level is supported")
    tlpb = per_level(d.get("transformer_layers_per_block", 1))
    if any(isinstance(x, (list, tuple)) for x in tlpb):
        problems.append("transformer_layers_per_block: one depth per level is supported")
    if problems:
        raise ValueError("unsupported diffusers UNet2DConditionModel config: " + "; ".join(problems))

    # heads: diffusers' attention_head_dim counts heads, per level (the middle block takes the last entry)
    heads = per_level(d.get("attention_head_dim", 8))
    used = [l for l in range(L) if attn[l]] + [L - 1]
    head_counts = {heads[l] for l in used}
    widths = {channels[l] // heads[l] for l in used}
    fixed_width = len(widths) == 1 and all(channels[l] % heads[l] == 0 for l in used)
    linear = bool(d.get("use_linear_projection", False))  # SD 2.x / XL: fixed head width where both fit
    if len(head_counts) == 1 and not (linear and fixed_width):
        num_heads, num_head_channels = heads[used[0]], -1
    elif fixed_width:
        num_heads, num_head_channels = 8, widths.pop()
    else:
        raise ValueError(f"unsupported diffusers UNet2DConditionModel config: attention_head_dim={heads} is neither one "
                         f"head count nor one head width over the levels {channels}")  # fmt: skip
    return dict(
        in_channels=d.get("in_channels", 4),
        out_channels=d.get("out_channels", 4),
        model_channels=mc,
        channel_mult=[c // mc for c in channels],
        num_res_blocks=per_level(lpb)[0],
        transformer_depth=[tlpb[l] if attn[l] else 0 for l in range(L)],
        transformer_depth_middle=tlpb[-1],
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        context_dim=ctx,
        use_linear_in_transformer=bool(d.get("use_linear_projection", False)),
        adm_in_channels=adm,
        use_scale_shift_norm=d.get("resnet_time_scale_shift", "default") == "scale_shift",
        norm_groups=d.get("norm_num_groups", 32),
        dropout=d.get("dropout", 0.0),
    )


def _identity(sd: StateDict, cfg: Any) -> StateDict:
    return dict(sd)


register_component(ComponentSpec(
    name="unet",
    build=UNet,
    from_diffusers=unet_diffusers_to_ours,
    to_diffusers=unet_ours_to_diffusers,
    from_original={"ldm": _identity},  # our names are the original openaimodel names
    to_original={"ldm": _identity},
    config_to_diffusers=unet_config_to_diffusers,
    config_from_diffusers=unet_config_from_diffusers,
))  # fmt: skip


def _no_foreign_layout(sd: StateDict, cfg: Any) -> StateDict:
    raise ValueError("conditions (ldm/conditions/) are stored in the ldm format only; save with format='ldm'")


def _build_conditions(model_cfg: Any) -> nn.Module:
    from .conditions import ConditionStack  # the condition types import the networks above

    return ConditionStack(model_cfg.conditions, model_cfg)


register_component(ComponentSpec(
    name="conditions",  # its config is the whole ModelConfig (a ControlNet copies the U-Net's shape)
    build=_build_conditions,
    from_diffusers=_no_foreign_layout,
    to_diffusers=_no_foreign_layout,
))  # fmt: skip
