"""TrainConfig: one typed, YAML-able description of a training or fine-tuning run (training/train.py runs it).

    cfg = load_train_config("configs/train/tiny.yaml", ["optim.lr=3e-4", "ema.decay=0.999"])

Sections and what they configure:

    task           unet: the denoiser (+ text towers, or LoRA) on a frozen VAE | vae: the autoencoder itself
    model          where the networks come from: a preset (random init, training from scratch) or a checkpoint;
                   ``model.vae``: take the VAE (weights and config) from another model, e.g. a task=vae run
    data           DataConfig (training/data_config.py); ``data.source: shapes`` is the builtin procedural dataset
    shapes         rows and ShapesConfig fields (ldm/shapes/config.py) of that builtin dataset
    loss           LossConfig (ldm/loss.py): weighting, noise offset, input perturbation
    optim          AdamW (or bitsandbytes' 8-bit AdamW), lr_schedule: constant | linear | cosine with warmup
    ema            null, or EMA of the trained weights (ldm/ema.py)
    lora           null, or LoRAConfig (ldm/lora.py): train low-rank adapters of the U-Net only
    cond_dropout   per condition, the probability of dropping it for classifier-free guidance
    conditions     further conditions (ldm/conditions/: class labels, ControlNet, ...), each reading a dataset column
    train_unet     false: the base U-Net stays frozen (train a ControlNet, an adapter, a new condition beside it)
    cache          keep VAE latents / text embeddings of the dataset in memory instead of recomputing them
    speed          the U-Net's speed switches (ldm/speed.py SpeedConfig): attention kernel, low-precision norms,
                   Triton GEGLU backward, channels-last, NHWC convolution gradients, GroupNorm reduced per
                   group over NHWC memory, compile (speed.compile=reduce-overhead: 1.51x diffusers' img/s at
                   512 px, 1.54x with attention_kernel=fa4, on an H200; ~2-4 min to compile)
    validation     prompts sampled every N steps to a PNG grid (task=vae: dataset images and reconstructions)
    vae_loss       task=vae: VAELossConfig (autoencoder/loss.py): reconstruction, KL weight, discriminator

``batch_size`` is per process and micro-batch: one optimizer step sees ``batch_size * grad_accum * processes``
images. ``max_steps`` counts optimizer steps; a step skipped for a non-finite loss still counts (it consumed
its data), so the learning rate and the data position never depend on how many steps were skipped.

Loading goes through ldm.config.load_config, so every error names its dotted key. One addition here: an override
of a key inside a section that is null (``ema.decay=0.999`` while ``ema: null``) first turns the section on with
its defaults, since OmegaConf cannot set a key of a null node.
"""
from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from autoencoder.loss import VAELossConfig
from ldm.checks import check_int
from ldm.conditions.spec import ConditionSpec, check_specs
from ldm.config import ConfigError, check_choices, choice, load_config, parse_overrides
from ldm.lora import LoRAConfig
from ldm.loss import LossConfig
from ldm.samplers.config import SamplerConfig
from ldm.speed import SpeedConfig

from .data_config import DataConfig

__all__ = [
    "CacheConfig", "CondDropoutConfig", "EMAConfig", "LRScheduleConfig", "ModelSource", "OptimConfig",
    "TrainConfig", "ValidationConfig", "MODEL_PRESETS", "load_train_config",
]

# model.source names that build a model from scratch: (ModelConfig constructor, argument)
MODEL_PRESETS = {
    "tiny": ("tiny", "sd1"), "tiny-sd1": ("tiny", "sd1"), "tiny-sd2": ("tiny", "sd2"), "tiny-sdxl": ("tiny", "sdxl"),
    "sd15": ("sd15", None), "sd21-v": ("sd21_v", None), "sd21-base": ("sd21_base", None),
    "sdxl-base": ("sdxl_base", None),
}
SHAPES_SOURCE = "shapes"
SHAPES_ROWS = "rows"  # the one key of the `shapes` section that is not a ShapesConfig field


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class ModelSource:
    """A preset name (random init: training from scratch), a ModelConfig YAML file (random init), or a checkpoint
    that ``ldm.bundle.load_bundle`` reads (original .safetensors, diffusers folder, ldm folder: fine-tuning)."""

    source: str = "tiny"  # tiny | tiny-sd2 | tiny-sdxl | sd15 | sd21-v | sd21-base | sdxl-base | a path
    overrides: list[str] = field(default_factory=list)  # ModelConfig KEY=VALUE, e.g. diffusion.prediction=v
    vae: Optional[str] = None  # a model (any format) whose VAE, weights and config, replaces this one's

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ValueError(f"model.source: must be a preset name or a path, got {self.source!r}")
        if self.vae is not None and not os.path.exists(self.vae):
            raise ValueError(f"model.vae: no such checkpoint file or folder: {self.vae!r}")
        try:
            parse_overrides(self.overrides)
        except ConfigError as e:
            raise ValueError(f"model.overrides: {e}") from None
        if self.source in MODEL_PRESETS or self.is_model_yaml:
            self.model_config()  # validate the overrides now, before any heavy work
        elif not os.path.exists(self.source):
            raise ValueError(
                f"model.source: {self.source!r} is neither a preset ({', '.join(MODEL_PRESETS)}) nor an existing "
                f"checkpoint file or folder"
            )

    @property
    def is_model_yaml(self) -> bool:
        return self.source.endswith((".yaml", ".yml")) and os.path.isfile(self.source)

    @property
    def from_scratch(self) -> bool:
        return self.source in MODEL_PRESETS or self.is_model_yaml

    def model_config(self):
        """The ModelConfig of a from-scratch source (preset or YAML) with the overrides applied."""
        from ldm.model_config import ModelConfig, load_model_config

        if self.is_model_yaml:
            base: Any = self.source
        else:
            ctor, arg = MODEL_PRESETS[self.source]
            base = getattr(ModelConfig, ctor)(*([arg] if arg else []))
        try:
            return load_model_config(base, self.overrides)
        except ConfigError as e:
            raise ValueError(f"model.overrides: {e}") from None


@dataclass
class OptimConfig:
    name: str = choice("adamw", "adamw", "adamw8bit")  # adamw8bit: bitsandbytes' AdamW8bit (CUDA)
    lr: float = 1e-4  # peak learning rate (after warmup)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-2
    eps: float = 1e-8
    fused: Optional[bool] = None  # torch's fused AdamW: null = where the device supports it (CUDA), true = require

    def __post_init__(self) -> None:
        check_choices(self, "optim")
        if not _is_num(self.lr) or self.lr <= 0:
            raise ValueError(f"optim.lr: must be a number > 0, got {self.lr!r}")
        if len(self.betas) != 2 or not all(_is_num(b) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas: must be [beta1, beta2] with 0 <= beta < 1, got {list(self.betas)!r}")
        self.betas = [float(b) for b in self.betas]
        if not _is_num(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay: must be >= 0, got {self.weight_decay!r}")
        if not _is_num(self.eps) or self.eps <= 0:
            raise ValueError(f"optim.eps: must be > 0, got {self.eps!r}")
        if self.name == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("optim.name: adamw8bit needs the bitsandbytes package, which is not installed "
                             "(pip install bitsandbytes; it needs a CUDA GPU); or use optim.name=adamw")  # fmt: skip
        if self.name == "adamw8bit" and self.fused:
            raise ValueError("optim.fused: bitsandbytes' AdamW8bit has no fused option; leave optim.fused null")


@dataclass
class LRScheduleConfig:
    """lr(step): linear warmup from 0 over ``warmup_steps``, then constant, or linear / cosine decay to
    ``min_lr_ratio * optim.lr`` at ``max_steps`` (cosine: Loshchilov & Hutter 2017, without restarts)."""

    name: str = choice("constant", "constant", "linear", "cosine")
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        check_choices(self, "lr_schedule")
        check_int("lr_schedule.warmup_steps", self.warmup_steps, 0)
        if not _is_num(self.min_lr_ratio) or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"lr_schedule.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio!r}")

    def factor(self, step: int, max_steps: int) -> float:
        """The multiplier of optim.lr for optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.name == "constant":
            return 1.0
        span = max(1, max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        decay = 1 - progress if self.name == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * decay


@dataclass
class EMAConfig:
    """Exponential moving average of the trained weights (ldm/ema.py); the EMA weights are validated and saved."""

    decay: float = 0.9999
    warmup: bool = True  # decay ramps up as min(decay, (1 + n) / (10 + n)) over the first updates
    update_after_step: int = 0  # optimizer steps before the EMA starts following the weights

    def __post_init__(self) -> None:
        if not _is_num(self.decay) or not 0 < self.decay < 1:
            raise ValueError(f"ema.decay: must be in (0, 1), got {self.decay!r}")
        check_int("ema.update_after_step", self.update_after_step, 0)


@dataclass
class CondDropoutConfig:
    """Per condition, the probability of dropping it in a training sample, so one network also learns the
    unconditional prediction that classifier-free guidance needs (Ho & Salimans 2022)."""

    text: float = 0.0  # the caption becomes "" (what inference encodes for the unconditional branch)
    sizes: float = 0.0  # SDXL: the size / crop embedding is zeroed (sgm's ucg_rate of those embedders)

    def __post_init__(self) -> None:
        for name in ("text", "sizes"):
            if not _is_num(getattr(self, name)) or not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"cond_dropout.{name}: a probability in [0, 1], got {getattr(self, name)!r}")


@dataclass
class CacheConfig:
    """Compute once and keep in memory: ``latents`` the VAE posterior (mean, logvar) of every image (sampled
    anew each step; images are then prepared with the evaluation transform: centre crop, no flip), ``text`` the
    text-tower outputs of every distinct caption (frozen text encoders only)."""

    latents: bool = False
    text: bool = False


@dataclass
class ValidationConfig:
    prompts: list[str] = field(default_factory=list)
    every: int = 0  # optimizer steps between validations; 0: only after the last step (when there are prompts)
    images_per_prompt: int = 1  # seeds sampler.seed, sampler.seed + 1, ...
    negative_prompt: str = ""  # the unconditional branch of classifier-free guidance
    resolution: Optional[Any] = None  # int or [height, width]; null: the training resolution
    use_ema: bool = True  # sample with the EMA weights when EMA is on
    recon_images: int = 8  # task=vae: the first N dataset images, reconstructed at each validation
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(name="euler", steps=20, cfg_scale=5.0, seed=0))

    def __post_init__(self) -> None:
        if not all(isinstance(p, str) for p in self.prompts):
            raise ValueError(f"validation.prompts: must be a list of strings, got {self.prompts!r}")
        self.prompts = list(self.prompts)
        for name in ("every", "images_per_prompt", "recon_images"):
            low = 0 if name in ("every", "recon_images") else 1
            check_int(f"validation.{name}", getattr(self, name), low)
        if self.resolution is not None:
            r = self.resolution
            items = [r] if _is_int(r) else list(r) if isinstance(r, (list, tuple)) else None
            if not items or len(items) not in (1, 2) or not all(_is_int(v) and v >= 8 for v in items):
                raise ValueError(f"validation.resolution: an integer >= 8, [height, width] or null, got {r!r}")
        if self.sampler.seed is None:
            raise ValueError("validation.sampler.seed: must be set, so validation images are comparable across steps")

    def size(self, default_hw: tuple[int, int]) -> tuple[int, int]:
        r = self.resolution
        if r is None:
            return default_hw
        return (r, r) if _is_int(r) else (int(r[0]), int(r[-1]))


@dataclass
class TrainConfig:
    task: str = choice("unet", "unet", "vae")  # what is trained: the denoiser, or the autoencoder
    model: ModelSource = field(default_factory=ModelSource)
    data: DataConfig = field(default_factory=DataConfig)
    shapes: dict[str, Any] = field(default_factory=lambda: {SHAPES_ROWS: 1000})  # data.source: shapes only
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    batch_size: int = 4  # per process and micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000  # optimizer steps
    mixed_precision: str = choice("no", "no", "fp16", "bf16")
    grad_clip: Optional[float] = 1.0  # max global gradient norm; null: no clipping (the norm is still logged)
    seed: int = 0  # weight init, noise and dropout (per process: seed + rank); data order: data.seed
    ema: Optional[EMAConfig] = None
    lora: Optional[LoRAConfig] = None
    train_text_encoder: bool = False  # train the text towers too (sensible for a tiny model trained from scratch)
    cond_dropout: CondDropoutConfig = field(default_factory=CondDropoutConfig)
    conditions: list[ConditionSpec] = field(default_factory=list)  # added to the model's (ldm/conditions/)
    train_unet: bool = True  # false: only the text towers / LoRA / conditions with train=true are trained
    cache: CacheConfig = field(default_factory=CacheConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)  # ldm/speed.py: attention kernel, channels-last, compile
    max_consecutive_skips: int = 10  # stop after this many optimizer steps in a row with a non-finite loss
    dist_timeout_s: int = 600  # several processes: a collective waiting longer fails the run (training/distributed.py)
    checkpoint_every: int = 500  # optimizer steps between checkpoints; 0: only at the end
    keep_last: int = 3  # checkpoints kept (older ones deleted once a newer one is complete); 0: keep all
    resume: str = "auto"  # auto: the latest checkpoint in output_dir if any | latest: it must exist | never | a folder
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    vae_loss: VAELossConfig = field(default_factory=VAELossConfig)  # task=vae
    vae_fit_scale: bool = True  # task=vae: set the saved VAE's scale_factor to 1 / std of its latents
    output_dir: str = "runs/train"
    log_every: int = 10  # optimizer steps between log lines / metric records

    def __post_init__(self) -> None:
        check_choices(self)
        for name, low in (("batch_size", 1), ("grad_accum", 1), ("max_steps", 1), ("seed", 0), ("log_every", 1),
                          ("checkpoint_every", 0), ("keep_last", 0), ("max_consecutive_skips", 1),
                          ("dist_timeout_s", 1)):  # fmt: skip
            check_int(name, getattr(self, name), low)
        if self.grad_clip is not None and (not _is_num(self.grad_clip) or self.grad_clip <= 0):
            raise ValueError(f"grad_clip: must be a number > 0 or null, got {self.grad_clip!r}")
        if not isinstance(self.output_dir, str) or not self.output_dir.strip():
            raise ValueError(f"output_dir: must be a non-empty path, got {self.output_dir!r}")
        if self.resume not in ("auto", "never", "latest") and not Path(self.resume).is_dir():
            raise ValueError(f"resume: must be auto, latest, never or an existing checkpoint folder, got {self.resume!r}")
        if self.task == "vae":
            self._check_vae_task()
        self._check_conditions()
        if self.lora is not None and self.train_text_encoder:
            raise ValueError("train_text_encoder: cannot be combined with lora (LoRA adapts the U-Net only); "
                             "set one of train_text_encoder=false or lora=null")  # fmt: skip
        inference_only = ("cuda_graphs", "fused_qkv", "fused_emb", "fused_context_kv", "shared_latent",
                          "triton_group_norm", "conv_plans")
        key = next((k for k in inference_only if getattr(self.speed, k)), None)
        if key is not None:
            raise ValueError(f"speed.{key}: inference only (no gradients through it); leave speed.{key} null for "
                             f"training")  # fmt: skip
        if self.cache.text and self.train_text_encoder:
            raise ValueError("cache.text: text embeddings cannot be cached while the text encoder is trained "
                             "(train_text_encoder=true); set cache.text=false")  # fmt: skip
        if self.cache.latents and self.data.random_flip > 0:
            raise ValueError("cache.latents: cached latents are computed once per image, so random flips cannot be "
                             "applied; set data.random_flip=0 or cache.latents=false")  # fmt: skip
        if self.data.streaming:
            raise ValueError("data.streaming: the trainer resumes mid-epoch by batch position, which needs a "
                             "map-style dataset; set data.streaming=false")  # fmt: skip
        self._check_shapes()
        src = self.data.source
        if src != SHAPES_SOURCE and not any(c in src for c in "*?[") and not os.path.exists(src):
            raise ValueError(f"data.source: no such file or folder: {src!r} (or the builtin dataset '{SHAPES_SOURCE}')")

    def _check_conditions(self) -> None:
        from ldm.conditions import condition_type  # the condition types import the networks

        self.conditions = check_specs(list(self.conditions))
        for spec in self.conditions:
            condition_type(spec).parse_args(spec)  # unknown types and bad args fail here, naming the entry
            if spec.column in (self.data.image_column, self.data.caption_column):
                raise ValueError(f"{spec.where}.column: {spec.column!r} is the image or caption column")
        if not isinstance(self.train_unet, bool):
            raise ValueError(f"train_unet: true or false, got {self.train_unet!r}")
        if self.task == "vae" and self.conditions:
            raise ValueError("conditions: have no meaning when training the autoencoder (task=vae); set conditions=[]")
        trains_something = (self.train_unet or self.lora is not None or self.train_text_encoder
                            or any(s.train for s in self.conditions))  # fmt: skip
        if self.task == "unet" and not trains_something:
            raise ValueError("train_unet: false, and no LoRA, text towers or condition with train=true: nothing would "
                             "be trained")  # fmt: skip
        names = [s.name for s in self.conditions if condition_type(s).value == "image"]
        if self.cache.latents and names:
            raise ValueError(f"cache.latents: the image conditions ({', '.join(names)}) are cropped and flipped with "
                             f"each image, which cached latents do not follow; set cache.latents=false")  # fmt: skip

    def _check_vae_task(self) -> None:
        clashes = [("lora", self.lora is not None, "null"), ("train_text_encoder", self.train_text_encoder, "false"),
                   ("cache.latents", self.cache.latents, "false"), ("cache.text", self.cache.text, "false"),
                   ("model.vae", self.model.vae is not None, "null")]  # fmt: skip
        for key, bad, fix in clashes:
            if bad:
                raise ValueError(f"{key}: has no meaning when training the autoencoder (task=vae); set {key}={fix}")

    def _check_shapes(self) -> None:
        if self.data.source != SHAPES_SOURCE:
            return
        from ldm.shapes import ShapesConfig

        rows = self.shapes.get(SHAPES_ROWS, 1000)
        if not _is_int(rows) or rows < 1:
            raise ValueError(f"shapes.{SHAPES_ROWS}: must be an integer >= 1, got {rows!r}")
        fields_ = {k: v for k, v in self.shapes.items() if k != SHAPES_ROWS}
        valid = set(ShapesConfig.__dataclass_fields__)
        unknown = sorted(set(fields_) - valid)
        if unknown:
            raise ValueError(f"shapes.{unknown[0]}: unknown key; valid keys: {SHAPES_ROWS}, {', '.join(sorted(valid))}")
        ShapesConfig(**fields_)  # its messages name shapes.<field>

    def shapes_config(self):
        from ldm.shapes import ShapesConfig

        return ShapesConfig(**{k: v for k, v in self.shapes.items() if k != SHAPES_ROWS})

    @property
    def shapes_rows(self) -> int:
        return int(self.shapes.get(SHAPES_ROWS, 1000))


_OPTIONAL_SECTIONS = ("ema", "lora")


def load_train_config(source: Any = None, overrides: Iterable[str] = ()) -> TrainConfig:
    """A TrainConfig from defaults < ``source`` (YAML path, dict or TrainConfig) < ``KEY=VALUE`` overrides;
    ConfigError names the key. ``ema.decay=0.999`` (or ``lora.rank=8``) turns a null section on with its defaults
    first (an ``ema={}`` override is put before it), since OmegaConf cannot set a key inside a null node."""
    overrides = list(overrides)
    parsed = parse_overrides(overrides)
    given = _peek(source)
    null = {name: given.get(name) is None for name in _OPTIONAL_SECTIONS}
    items: list[str] = []
    for item, (key, value) in zip(overrides, parsed):
        head = key.split(".")[0].split("[")[0]
        if head in null:
            if key == head:
                null[head] = value is None
            elif null[head]:
                items.append(f"{head}={{}}")
                null[head] = False
        items.append(item)
    return load_config(TrainConfig, source, items)


def _peek(source: Any) -> dict:
    """The top-level values ``source`` sets (only to know whether its optional sections are null)."""
    if isinstance(source, TrainConfig):
        return {name: getattr(source, name) for name in _OPTIONAL_SECTIONS}
    if isinstance(source, dict):
        return source
    if isinstance(source, (str, os.PathLike)) and Path(source).is_file():
        import yaml

        try:
            data = yaml.safe_load(Path(source).read_text(encoding="utf-8"))
        except yaml.YAMLError:
            return {}  # load_config reports it, naming the file
        return data if isinstance(data, dict) else {}
    return {}
