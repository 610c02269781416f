"""ModelConfig: everything needed to build a Stable Diffusion model bundle, as one typed, YAML-able dataclass.

    family      sd1 | sd2 | sdxl | custom   (conventions used when reading foreign checkpoints)
    diffusion   DiffusionConfig             training schedule + what the network predicts (eps / v / x0)
    unet        UNetConfig
    vae         AutoencoderConfig
    text        [TextEncoderConfig, ...]    1 tower (SD 1.x, 2.x) or 2 (SDXL: CLIP ViT-L, OpenCLIP bigG)
    conditions  [ConditionSpec, ...]        further conditions (ldm/conditions/: class labels, controls, ...)

How the parts fit (checked in ``__post_init__``):
- the U-Net cross-attends to the towers' hidden states concatenated along features:
  ``unet.context_dim == sum(t.width for t in text)``;
- the pooled vector comes from the one tower with ``return_pooled``; SDXL's U-Net vector is that pooled
  vector plus 6 size/crop ids embedded with 256 sinusoidal features each (Podell et al. 2023, sec. 2.2):
  ``unet.adm_in_channels == pooled width + 6 * 256``;
- the U-Net predicts in latent space: ``unet.out_channels == vae.latent_channels``;
- each further condition widens the U-Net input it enters (``ldm.conditions.condition_widths``): context features
  after the text's, vector features after the pooled text / SDXL sizes, input channels after the latent's.

Per-tower overrides name the tower by index: ``text[0].heads=4``, ``text[1].layer=-3``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Optional

from omegaconf import OmegaConf

from .conditions.spec import ConditionSpec, check_specs
from .config import check_choices, choice, load_config
from .denoiser import DiffusionConfig
from .text_config import TextEncoderConfig
from .unet import UNetConfig
from .vae_config import AutoencoderConfig

FAMILIES = ("sd1", "sd2", "sdxl", "custom")
SDXL_SIZE_IDS = 6  # original size (h, w), crop top-left (top, left), target size (h, w)
SDXL_SIZE_EMBED_DIM = 256  # sinusoidal features per id (diffusers: addition_time_embed_dim)


def sdxl_size_embedding(sizes):
    """(B, 6) ids (original h, w, crop top, left, target h, w) -> (B, 6 * 256) fp32: each id's sinusoid, in order
    (Podell et al. 2023, sec. 2.2; the U-Net's vector is the pooled text followed by this)."""
    from .unet_blocks import timestep_embedding

    b = sizes.shape[0]
    return timestep_embedding(sizes.flatten().float(), SDXL_SIZE_EMBED_DIM).reshape(b, -1)


PUBLISHED_MODEL_CHANNELS = 320  # the U-Net width of every published SD 1.x / 2.x / XL model


@dataclass
class ModelConfig:
    family: str = choice("sd1", *FAMILIES)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    text: list[TextEncoderConfig] = field(default_factory=lambda: [TextEncoderConfig.sd1()])
    conditions: list[ConditionSpec] = field(default_factory=list)
    # [height, width] in pixels the model was trained at (training writes it); null: the family's published size,
    # or an 8 x 8 latent for test-sized models. The pipeline's, ldm eval's and ldm analyze's default size.
    sample_size: Optional[list[int]] = None

    def __post_init__(self) -> None:
        check_choices(self)
        if self.sample_size is not None:
            size = list(self.sample_size)
            if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 8 for v in size):
                raise ValueError(f"sample_size: [height, width], integers >= 8, or null; got {self.sample_size!r}")
            self.sample_size = size
        self.conditions = check_specs(list(self.conditions))
        added = self.condition_widths()
        self.text = list(self.text)
        if not self.text or not all(isinstance(t, TextEncoderConfig) for t in self.text):
            raise ValueError("text: needs one or more text towers (TextEncoderConfig)")
        want = {"sd1": 1, "sd2": 1, "sdxl": 2}.get(self.family)
        if want is not None and len(self.text) != want:
            raise ValueError(f"text: family {self.family!r} has {want} text tower(s), got {len(self.text)}")
        widths = [t.width for t in self.text]
        if self.unet.context_dim != sum(widths) + added["context"]:
            cond = f" + {added['context']} (conditions)" if added["context"] else ""
            raise ValueError(
                f"unet.context_dim: {self.unet.context_dim} != {' + '.join(map(str, widths))}{cond}, the summed widths of "
                f"the text towers (and context conditions) whose tokens the U-Net cross-attends to"
            )
        pooled = [i for i, t in enumerate(self.text) if t.return_pooled]
        if len(pooled) > 1:
            raise ValueError(f"text: only one tower may return the pooled vector, towers {pooled} do")
        if self.family == "sdxl":
            if not pooled:
                raise ValueError("text: SDXL needs a tower with return_pooled=True (bigG) for the U-Net's vector")
            want_adm = self.pooled_dim + SDXL_SIZE_IDS * SDXL_SIZE_EMBED_DIM + added["vector"]
            if self.unet.adm_in_channels != want_adm:
                raise ValueError(
                    f"unet.adm_in_channels: SDXL's vector is the pooled text ({self.pooled_dim}) plus {SDXL_SIZE_IDS} "
                    f"size/crop embeddings of {SDXL_SIZE_EMBED_DIM} (+ {added['vector']} of conditions) = {want_adm}, "
                    f"got {self.unet.adm_in_channels}"
                )
        elif self.unet.adm_in_channels - added["vector"] and not pooled and self.family != "custom":
            raise ValueError("unet.adm_in_channels: a vector condition needs a text tower with return_pooled=True "
                             "or a condition entering the vector (conditions)")  # fmt: skip
        elif added["vector"] and self.unet.adm_in_channels < added["vector"]:
            raise ValueError(f"unet.adm_in_channels: {self.unet.adm_in_channels} < {added['vector']}, the vector "
                             f"features the conditions add")  # fmt: skip
        if self.unet.out_channels != self.vae.latent_channels:
            raise ValueError(
                f"unet.out_channels: {self.unet.out_channels} != vae.latent_channels ({self.vae.latent_channels}); "
                f"the U-Net predicts in the autoencoder's latent space"
            )
        if self.unet.in_channels < self.vae.latent_channels + added["concat"]:
            raise ValueError(
                f"unet.in_channels: {self.unet.in_channels} < vae.latent_channels ({self.vae.latent_channels})"
                + (f" + {added['concat']} channels of conditions" if added["concat"] else "")
            )

    def condition_widths(self) -> dict[str, int]:
        """What the conditions add to the U-Net's inputs: {"context": D, "vector": V, "concat": C}."""
        from .conditions import condition_widths  # the condition types import the networks

        return condition_widths(self.conditions, self)

    def with_conditions(self, specs: list[ConditionSpec]) -> "ModelConfig":
        """This model with ``specs`` as its conditions and the U-Net's input widths derived from them: context_dim,
        adm_in_channels and in_channels grow by what the new conditions add over the current ones."""
        from .conditions import condition_widths

        old, new = self.condition_widths(), condition_widths(check_specs(list(specs)), self)
        u = self.unet
        unet = replace(u, context_dim=u.context_dim + new["context"] - old["context"],
                       adm_in_channels=u.adm_in_channels + new["vector"] - old["vector"],
                       in_channels=u.in_channels + new["concat"] - old["concat"])  # fmt: skip
        return replace(self, unet=unet, conditions=list(specs))

    def parts(self) -> list[tuple[str, str, Any]]:
        """(part name, registered component, its config) for every network: unet, vae, text.0 [, text.1].

        Part names are the key prefixes of our checkpoint format (``unet.*``, ``vae.*``, ``text.0.*`` ...)."""
        return [("unet", "unet", self.unet), ("vae", "vae", self.vae)] + [
            (f"text.{i}", "text", t) for i, t in enumerate(self.text)
        ] + ([("conditions", "conditions", self)] if self.conditions else [])

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled text vector (0 if no tower returns one)."""
        for t in self.text:
            if t.return_pooled:
                return t.projection_dim or t.width
        return 0

    # ---- presets: the published models ----

    @classmethod
    def sd15(cls) -> "ModelConfig":
        """Stable Diffusion 1.x (v1-inference.yaml): eps prediction, CLIP ViT-L/14 last layer."""
        return cls(family="sd1", diffusion=DiffusionConfig(prediction="eps"), unet=UNetConfig.sd15(),
                   vae=AutoencoderConfig.sd(), text=[TextEncoderConfig.sd1()])  # fmt: skip

    @classmethod
    def sd21_v(cls) -> "ModelConfig":
        """Stable Diffusion 2.x 768-v (v2-inference-v.yaml): v prediction, OpenCLIP ViT-H/14 penultimate layer."""
        return cls(family="sd2", diffusion=DiffusionConfig(prediction="v"), unet=UNetConfig.sd21(),
                   vae=AutoencoderConfig.sd(), text=[TextEncoderConfig.sd2()])  # fmt: skip

    @classmethod
    def sd21_base(cls) -> "ModelConfig":
        """Stable Diffusion 2.x base 512 (v2-inference.yaml): as sd21_v but eps prediction."""
        return replace(cls.sd21_v(), diffusion=DiffusionConfig(prediction="eps"))

    @classmethod
    def sdxl_base(cls) -> "ModelConfig":
        """SDXL 1.0 base (sd_xl_base.yaml): eps prediction, CLIP ViT-L + OpenCLIP bigG, 2816-wide vector."""
        return cls(family="sdxl", diffusion=DiffusionConfig(prediction="eps"), unet=UNetConfig.sdxl_base(),
                   vae=AutoencoderConfig.sdxl(),
                   text=[TextEncoderConfig.sdxl_clip_l(), TextEncoderConfig.sdxl_bigg()])  # fmt: skip

    @classmethod
    def preset(cls, family: str) -> "ModelConfig":
        """The published model of a family: sd1 -> sd15, sd2 -> sd21_v, sdxl -> sdxl_base."""
        presets = {"sd1": cls.sd15, "sd2": cls.sd21_v, "sdxl": cls.sdxl_base}
        if family not in presets:
            raise ValueError(f"family: {family!r} has no preset; one of: {', '.join(presets)}")
        return presets[family]()

    @classmethod
    def tiny(cls, family: str = "sd1") -> "ModelConfig":
        """Test-sized networks with the family's shape features (UNetConfig.tiny, AutoencoderConfig.tiny,
        TextEncoderConfig.tiny), widths made consistent: context = summed tower widths, SDXL vector = pooled + 1536."""
        full = cls.preset(family)
        text = [t.tiny() for t in full.text]
        pooled = next(((t.projection_dim or t.width) for t in text if t.return_pooled), 0)
        adm = pooled + SDXL_SIZE_IDS * SDXL_SIZE_EMBED_DIM if full.unet.adm_in_channels else 0
        unet = full.unet.tiny(context_dim=sum(t.width for t in text), adm_in_channels=adm)
        vae = AutoencoderConfig.tiny(scale_factor=full.vae.scale_factor)
        return cls(family=family, diffusion=full.diffusion, unet=unet, vae=vae, text=text)


# --------------------------------------------------------------------------------------------- loading


def model_config_to_dict(cfg: ModelConfig) -> dict:
    """Plain data (lists, not tuples) of a ModelConfig, as written to YAML."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def load_model_config(source: Any = None, overrides: Iterable[str] = ()) -> ModelConfig:
    """A ModelConfig from a ModelConfig / dict / YAML path (None: defaults), then ``KEY=VALUE`` overrides
    (``text[i].field=value`` for a tower). Raises ConfigError naming the key."""
    return load_config(ModelConfig, source, list(overrides))
