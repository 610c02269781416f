"""Text-tower configs: which CLIP text transformer, which layer is read, how prompts are padded.

The networks are in text_encoder/ (built on open_clip). The configs live in ``ldm`` because ModelConfig composes
every component's config and ``ldm`` may import nothing of ours (ARCHITECTURE.md: "autoencoder and
text_encoder may import ldm (config, registry)").
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

VOCAB_SIZE = 49408
SOT_ID = 49406  # <start_of_text>
EOT_ID = 49407  # <end_of_text>
PAD_OPENAI = EOT_ID  # SD 1.x, SDXL CLIP-L (transformers CLIPTokenizer pads with <|endoftext|>)
PAD_OPENCLIP = 0  # SD 2.x, SDXL bigG (open_clip.tokenize pads with zeros)
CONTEXT_LENGTH = 77

ACTIVATION_NAMES = ("quick_gelu", "gelu")  # OpenAI CLIP uses QuickGELU, OpenCLIP H / bigG exact GELU
LAYER_NAMES = {"last": -1, "penultimate": -2}


@dataclass
class TextEncoderConfig:
    width: int  # D
    layers: int  # L residual attention blocks
    heads: int
    act: Literal["quick_gelu", "gelu"]
    layer: str | int = "last"  # "last" | "penultimate" | index into the L + 1 hidden states (see module doc)
    final_norm: bool = True  # apply ln_final to the chosen layer
    projection_dim: int | None = None  # P: a (D, P) text_projection parameter exists
    return_pooled: bool = False  # forward also returns ln_final(last)[argmax(ids)] (@ text_projection if any)
    pad_id: int = PAD_OPENAI  # padding convention of the original tokenizer (text_encoder.tokenizer)
    vocab_size: int = VOCAB_SIZE
    context_length: int = CONTEXT_LENGTH

    def __post_init__(self):
        for name in ("width", "layers", "heads", "vocab_size", "context_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TextEncoderConfig.{name} must be a positive int, got {v!r}")
        if self.width % self.heads:
            raise ValueError(f"TextEncoderConfig.width ({self.width}) must be divisible by heads ({self.heads})")
        if self.act not in ACTIVATION_NAMES:
            raise ValueError(f"TextEncoderConfig.act must be one of {sorted(ACTIVATION_NAMES)}, got {self.act!r}")
        self.layer_index()  # validates layer
        if not isinstance(self.final_norm, bool) or not isinstance(self.return_pooled, bool):
            raise ValueError("TextEncoderConfig.final_norm and return_pooled must be bools")
        p = self.projection_dim
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 1):
            raise ValueError(f"TextEncoderConfig.projection_dim must be a positive int or None, got {p!r}")
        if isinstance(self.pad_id, bool) or not isinstance(self.pad_id, int) or not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"TextEncoderConfig.pad_id must be an int in [0, vocab_size), got {self.pad_id!r}")

    def layer_index(self, layer: str | int | None = None) -> int:
        """``layer`` (default: this config's) -> how many blocks produce it, in [0, layers]."""
        layer = self.layer if layer is None else layer
        n = self.layers
        if isinstance(layer, str) and layer in LAYER_NAMES:
            layer = LAYER_NAMES[layer]
        if isinstance(layer, bool) or not isinstance(layer, int) or not -(n + 1) <= layer <= n:
            raise ValueError(
                f"layer must be 'last', 'penultimate' or an int in [{-(n + 1)}, {n}] "
                f"(index into the {n + 1} hidden states), got {layer!r}"
            )
        return layer % (n + 1)

    def with_clip_skip(self, k: int) -> "TextEncoderConfig":
        """Clip skip k: take the k-th hidden state from the end (1 = last, 2 = penultimate); final_norm unchanged."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.layers:
            raise ValueError(f"clip skip k must be an int in [1, {self.layers}], got {k!r}")
        return replace(self, layer=-k)

    # ---- presets: published sizes and how each Stable Diffusion generation reads the tower ----

    @classmethod
    def sd1(cls) -> "TextEncoderConfig":
        """SD 1.x: OpenAI CLIP ViT-L/14 text (123,060,480 parameters), last layer after ln_final."""
        return cls(width=768, layers=12, heads=12, act="quick_gelu", layer="last", final_norm=True)

    @classmethod
    def sd2(cls) -> "TextEncoderConfig":
        """SD 2.x: OpenCLIP ViT-H/14 text incl. its (unused) text_projection, penultimate layer after ln_final."""
        return cls(
            width=1024, layers=24, heads=16, act="gelu", layer="penultimate", final_norm=True,
            projection_dim=1024, pad_id=PAD_OPENCLIP,
        )  # fmt: skip

    @classmethod
    def sdxl_clip_l(cls) -> "TextEncoderConfig":
        """SDXL's first tower: OpenAI CLIP ViT-L/14 text, penultimate layer, no final norm."""
        return replace(cls.sd1(), layer="penultimate", final_norm=False)

    @classmethod
    def sdxl_bigg(cls) -> "TextEncoderConfig":
        """SDXL's second tower: OpenCLIP ViT-bigG/14 text, penultimate layer, no final norm, pooled (1280)."""
        return cls(
            width=1280, layers=32, heads=20, act="gelu", layer="penultimate", final_norm=False,
            projection_dim=1280, return_pooled=True, pad_id=PAD_OPENCLIP,
        )  # fmt: skip

    @classmethod
    def preset(cls, name: str, tiny: bool = False) -> "TextEncoderConfig":
        """A preset by name ("sd1", "sd2", "sdxl_clip_l", "sdxl_bigg"); tiny=True shrinks it for CPU tests."""
        if name not in PRESETS:
            raise ValueError(f"text encoder preset must be one of {sorted(PRESETS)}, got {name!r}")
        cfg = getattr(cls, name)()
        return cfg.tiny() if tiny else cfg

    def tiny(self) -> "TextEncoderConfig":
        """Same reading of the tower at test size: width 32, 3 blocks, 4 heads; a non-square projection (32 -> 24)
        so that a transposed text_projection cannot go unnoticed. Vocabulary and context stay real."""
        return replace(self, width=32, layers=3, heads=4, projection_dim=24 if self.projection_dim else None)


PRESETS = ("sd1", "sd2", "sdxl_clip_l", "sdxl_bigg")


@dataclass
class SDXLTextConfig:
    clip_l: TextEncoderConfig = field(default_factory=TextEncoderConfig.sdxl_clip_l)
    bigg: TextEncoderConfig = field(default_factory=TextEncoderConfig.sdxl_bigg)

    def __post_init__(self):
        for name in ("clip_l", "bigg"):
            if not isinstance(getattr(self, name), TextEncoderConfig):
                raise ValueError(f"SDXLTextConfig.{name} must be a TextEncoderConfig")
        if self.clip_l.context_length != self.bigg.context_length:
            raise ValueError(
                f"SDXLTextConfig: clip_l.context_length ({self.clip_l.context_length}) must equal "
                f"bigg.context_length ({self.bigg.context_length}) to concatenate the tokens"
            )
        if not self.bigg.return_pooled:
            raise ValueError("SDXLTextConfig.bigg.return_pooled must be True: SDXL's pooled vector comes from bigG")

    @classmethod
    def tiny(cls) -> "SDXLTextConfig":
        """Both towers at test size (see TextEncoderConfig.tiny)."""
        return cls(clip_l=TextEncoderConfig.sdxl_clip_l().tiny(), bigg=TextEncoderConfig.sdxl_bigg().tiny())

    @property
    def context_dim(self) -> int:
        return self.clip_l.width + self.bigg.width  # 768 + 1280 = 2048

    @property
    def pooled_dim(self) -> int:
        return self.bigg.projection_dim or self.bigg.width  # 1280
