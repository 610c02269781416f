"""UNetConfig: the U-Net's shapes (SD 1.x / 2.x / XL presets, a tiny variant for tests, and the original
``openaimodel.UNetModel`` parameters); the network itself is ldm/unet.py."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

from .attention import check_backend


@dataclass
class UNetConfig:
    in_channels: int = 4  # latent channels + concatenated condition channels (9 for SD inpainting)
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # channels per level = model_channels * mult
    num_res_blocks: int = 2  # ResBlocks per level on the way down (one more on the way up)
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)  # transformer blocks per level; 0 = no attention there
    transformer_depth_middle: int = 1
    num_heads: int = 8  # heads per attention layer, used when num_head_channels == -1 (SD 1.x)
    num_head_channels: int = -1  # if > 0: fixed head width, heads = channels // num_head_channels (SD 2.x, XL)
    context_dim: int = 768  # width of the cross-attention tokens (cond.context)
    use_linear_in_transformer: bool = False  # proj_in/proj_out as Linear (SD 2.x, XL) instead of 1x1 Conv2d
    adm_in_channels: int = 0  # width of cond.vector fed through label_emb; 0 = no vector condition
    num_classes: int = 0  # > 0: cond.vector holds (B,) class labels, embedded by label_emb (nn.Embedding)
    use_scale_shift_norm: bool = False  # ResBlock: AdaGN scale-shift instead of adding the embedding
    norm_groups: int = 32
    dropout: float = 0.0
    attention: str = "sdpa"  # sdpa | xformers | math (ldm/attention.py)
    sdpa_kernel: str = "auto"  # auto | cudnn | flash | efficient | math | fastest | fa4 (ldm/speed.py picks it on CUDA)
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        self.channel_mult = tuple(self.channel_mult)  # YAML / OmegaConf hand in lists
        self.transformer_depth = tuple(self.transformer_depth)
        check_backend(self.attention, self.sdpa_kernel)
        for name in ("in_channels", "out_channels", "model_channels", "num_res_blocks", "norm_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"unet.{name}: must be >= 1, got {getattr(self, name)}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"unet.channel_mult: needs one or more positive multipliers, got {self.channel_mult}")
        if len(self.transformer_depth) != len(self.channel_mult) or min(self.transformer_depth) < 0:
            raise ValueError(
                f"unet.transformer_depth: needs one depth >= 0 per level ({len(self.channel_mult)} levels), "
                f"got {self.transformer_depth}"
            )
        if self.transformer_depth_middle < 1:
            raise ValueError(f"unet.transformer_depth_middle: must be >= 1, got {self.transformer_depth_middle}")
        if self.num_head_channels == -1 and self.num_heads < 1:
            raise ValueError("unet.num_heads: must be >= 1 when num_head_channels is -1")
        if self.num_head_channels != -1 and self.num_head_channels < 1:
            raise ValueError(f"unet.num_head_channels: must be -1 or >= 1, got {self.num_head_channels}")
        if self.context_dim < 1:
            raise ValueError(f"unet.context_dim: must be >= 1, got {self.context_dim}")
        if self.adm_in_channels < 0:
            raise ValueError(f"unet.adm_in_channels: must be >= 0, got {self.adm_in_channels}")
        if self.num_classes < 0:
            raise ValueError(f"unet.num_classes: must be >= 0, got {self.num_classes}")
        if self.num_classes and self.adm_in_channels:
            raise ValueError(
                f"unet.num_classes={self.num_classes} and unet.adm_in_channels={self.adm_in_channels}: both feed "
                f"label_emb from cond.vector; set one of them"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"unet.dropout: must be in [0, 1), got {self.dropout}")
        for level, mult in enumerate(self.channel_mult):
            ch = self.model_channels * mult
            if ch % self.norm_groups:
                raise ValueError(
                    f"unet.model_channels * channel_mult[{level}] = {ch} is not divisible by "
                    f"norm_groups={self.norm_groups}"
                )
            if self.transformer_depth[level] or level == len(self.channel_mult) - 1:  # last level: middle block
                self.heads(ch)

    def heads(self, channels: int) -> tuple[int, int]:
        """(heads, dim_head) of a transformer on ``channels`` channels, as the original computes them."""
        if self.num_head_channels == -1:
            if channels % self.num_heads:
                raise ValueError(f"unet.num_heads={self.num_heads} does not divide a level's {channels} channels")
            return self.num_heads, channels // self.num_heads
        if channels % self.num_head_channels:
            raise ValueError(
                f"unet.num_head_channels={self.num_head_channels} does not divide a level's {channels} channels"
            )
        return channels // self.num_head_channels, self.num_head_channels

    # ---- presets: the published networks (original yaml configs) ----

    @classmethod
    def sd15(cls, **overrides: Any) -> "UNetConfig":
        """SD 1.x (v1-inference.yaml); ``sd15(in_channels=9)`` is the inpainting U-Net."""
        return cls(**overrides)

    @classmethod
    def sd21(cls, **overrides: Any) -> "UNetConfig":
        """SD 2.x (v2-inference(-v).yaml): 64-wide heads, linear projections, OpenCLIP ViT-H tokens."""
        kw = dict(num_head_channels=64, use_linear_in_transformer=True, context_dim=1024)
        return cls(**{**kw, **overrides})

    @classmethod
    def sdxl_base(cls, **overrides: Any) -> "UNetConfig":
        """SDXL 1.0 base (sd_xl_base.yaml): three levels, no attention on the first, 2816-wide vector."""
        kw = dict(
            channel_mult=(1, 2, 4),
            transformer_depth=(0, 2, 10),
            transformer_depth_middle=10,
            num_head_channels=64,
            use_linear_in_transformer=True,
            context_dim=2048,
            adm_in_channels=2816,
        )
        return cls(**{**kw, **overrides})

    def tiny(self, **overrides: Any) -> "UNetConfig":
        """A test-sized copy with the same shape features (levels, which levels attend, head rule, linear
        projections, vector condition): 32 base channels, multipliers and depths capped at 2, small widths."""
        kw = dict(
            model_channels=32,
            channel_mult=tuple(min(m, 2) for m in self.channel_mult),
            transformer_depth=tuple(min(d, 2) for d in self.transformer_depth),
            transformer_depth_middle=min(self.transformer_depth_middle, 2),
            num_heads=2,
            num_head_channels=16 if self.num_head_channels != -1 else -1,
            context_dim=24,
            adm_in_channels=40 if self.adm_in_channels else 0,
            norm_groups=8,
        )
        return replace(self, **{**kw, **overrides})

    @classmethod
    def from_original(cls, params: Mapping[str, Any], **overrides: Any) -> "UNetConfig":
        """From an original LDM/SGM yaml's ``unet_config.params`` / ``network_config.params``.

        The original marks attention levels by downsampling factor (``attention_resolutions``: 1, 2, 4 ...)
        and gives one depth or one per level; here a level's depth is 0 where it has no attention.
        ``use_checkpoint`` (a training setting) is not carried over: set ``gradient_checkpointing``."""
        mult = tuple(params["channel_mult"])
        depth = params.get("transformer_depth", 1)
        depth = [depth] * len(mult) if isinstance(depth, int) else list(depth)
        attn = set(params.get("attention_resolutions", ()))
        res = params.get("num_res_blocks", 2)
        if not isinstance(res, int):
            if len(set(res)) != 1:
                raise ValueError(f"num_res_blocks: one count for every level is supported, got {res}")
            res = res[0]
        if not isinstance(params.get("context_dim", 768), int):
            raise ValueError(f"context_dim: one width for every level is supported, got {params['context_dim']}")
        kw = dict(
            in_channels=params["in_channels"],
            out_channels=params["out_channels"],
            model_channels=params["model_channels"],
            channel_mult=mult,
            num_res_blocks=res,
            transformer_depth=tuple(depth[l] if 2**l in attn else 0 for l in range(len(mult))),
            transformer_depth_middle=params.get("transformer_depth_middle") or depth[-1],
            num_heads=params.get("num_heads", cls.num_heads),
            num_head_channels=params.get("num_head_channels", -1),
            context_dim=params.get("context_dim", 768),
            use_linear_in_transformer=params.get("use_linear_in_transformer", False),
            adm_in_channels=params.get("adm_in_channels", 0) if params.get("num_classes") == "sequential" else 0,
            num_classes=params["num_classes"] if isinstance(params.get("num_classes"), int) else 0,
            use_scale_shift_norm=params.get("use_scale_shift_norm", False),
            dropout=params.get("dropout", 0.0),
        )
        return cls(**{**kw, **overrides})
