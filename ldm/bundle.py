"""A model bundle: the networks of one Stable Diffusion model with their config, and loading / saving it.

    bundle = load_bundle("sd_xl_base_1.0.safetensors", dtype=torch.float16, device="cuda")
    denoise = bundle.denoiser()                          # D(x, sigma, cond) -> x0 (ldm/denoiser.py)
    context, pooled = bundle.encode_prompts(["a fox"])   # (B, 77, 2048), (B, 1280)
    save_bundle(bundle, "sdxl-base", format="ldm")       # or "original" (one .safetensors file), "diffusers"

Three on-disk formats (ldm/formats/): the original single file (``.safetensors`` / weights-only ``.ckpt``), a
diffusers folder, and ours (a folder with model.safetensors + config.yaml). ``load_bundle`` tells them apart by
their files (ldm/formats/detect.py), builds every network on the meta device and assigns the file's tensors,
converted straight to the requested dtype and device (ldm.checkpoint.load_into): weights are never held twice.

The networks come from the component registry (ldm/components.py); ``import autoencoder, text_encoder`` (inference
and training do) registers the VAE and the text towers.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from .checkpoint import CheckpointError, LoadReport, compare_keys, load_into
from .components import get_component
from .denoiser import Denoiser
from .formats import FORMATS, detect_format
from .model_config import ModelConfig

Progress = Callable[[str], None]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Bundle(nn.Module):
    """The networks of one model: ``unet``, ``vae``, ``text`` (a ModuleList of towers), and ``config``.

    ``state_dict()`` keys are those of our checkpoint format: ``unet.*``, ``vae.*``, ``text.{i}.*``.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"Bundle needs a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.unet = get_component("unet").build(config.unet)
        self.vae = get_component("vae").build(config.vae)
        self.text = nn.ModuleList(get_component("text").build(t) for t in config.text)
        self.conditions = get_component("conditions").build(config) if config.conditions else None
        self.load_reports: dict[str, LoadReport] = {}  # per part, filled by load_bundle

    def parts(self) -> dict[str, nn.Module]:
        """{"unet": ..., "vae": ..., "text.0": ... [, "text.1": ...] [, "conditions": ...]} (ModelConfig.parts)."""
        parts = {"unet": self.unet, "vae": self.vae, **{f"text.{i}": t for i, t in enumerate(self.text)}}
        return parts | ({"conditions": self.conditions} if self.conditions is not None else {})

    def network(self) -> nn.Module:
        """``net(x, t, cond)``: the U-Net, with the model's conditions applied when it has any (ldm/conditions/)."""
        if self.conditions is None:
            return self.unet
        from .conditions import ConditionedUNet, member_widths

        return ConditionedUNet(self.unet, self.conditions, member_widths(self.conditions, self.config))

    def denoiser(self, quantize: bool = False) -> Denoiser:
        """The network wrapped as ``D(x, sigma, cond) -> x0`` with this model's schedule and prediction type."""
        return Denoiser.from_config(self.network(), self.config.diffusion, quantize)

    def encode_prompts(self, prompts: str | Sequence[str]) -> tuple[Tensor, Tensor | None]:
        """Prompts -> (context (B, T, sum of tower widths), pooled (B, P) or None), as the U-Net receives them:
        the towers' hidden states concatenated along features, the pooled vector of the tower that returns one."""
        hidden, pooled = [], None
        for tower in self.text:
            ids = tower.tokenize(prompts).to(tower.token_embedding.weight.device)  # (B, T)
            h, p = tower(ids)  # (B, T, D_i), (B, P) or None
            hidden.append(h)
            pooled = p if p is not None else pooled
        return torch.cat(hidden, dim=-1), pooled


# ------------------------------------------------------------------------------------------------ load


def load_bundle(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    family: str | None = None,
    prediction: str | None = None,
    strict: bool = True,
    config_overrides: Iterable[str] = (),
    progress: Progress | None = None,
) -> Bundle:
    """Load a model from an original single file, a diffusers folder or our folder (detected from the files).

    dtype: floating-point dtype of every network (torch dtype or "fp32" / "fp16" / "bf16"); None keeps the dtype
        the weights are stored in (per network; the widest if a network mixes dtypes).
    family, prediction: override what is detected ("sd1" | "sd2" | "sdxl" | "custom"; "eps" | "v" | "x0").
    config_overrides: ``KEY=VALUE`` strings applied last, e.g. ``["unet.num_head_channels=16", "text[0].heads=4"]``
        for checkpoints whose head counts cannot be read from the tensor shapes.
    strict: any missing, unexpected or mis-shaped tensor is an error naming the file. strict=False loads what
        fits, builds networks with missing tensors normally (random init) and records ``bundle.load_reports``.
    """
    path = Path(path)
    dtype = _dtype(dtype)
    say = progress or (lambda msg: None)
    fmt = detect_format(path)
    say(f"reading {path} ({FORMATS[fmt].DESCRIPTION})")
    cfg, parts = FORMATS[fmt].read(
        path, family=family, prediction=prediction, overrides=list(config_overrides), strict=strict, progress=say
    )
    return assemble(cfg, parts, dtype=dtype, device=device, strict=strict, source=str(path), progress=say)


def assemble(
    cfg: ModelConfig,
    parts: dict[str, dict[str, Tensor]],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    strict: bool = True,
    source: str = "state dict",
    progress: Progress | None = None,
) -> Bundle:
    """A Bundle built on the meta device, filled from per-part state dicts in our layout (consumed: ``parts`` is
    emptied as it goes, so each tensor is referenced by the module alone once loaded)."""
    say = progress or (lambda msg: None)
    unknown = sorted(set(parts) - {name for name, _, _ in cfg.parts()})
    if unknown:
        raise CheckpointError(f"{source}: parts not in this model config: {', '.join(unknown)}")
    with torch.device("meta"):
        bundle = Bundle(cfg)
    for name, component, part_cfg in cfg.parts():
        sd = parts.pop(name, None)
        if sd is None:
            raise CheckpointError(f"{source}: no weights for the {name} network")
        module = bundle.parts()[name]
        want = dtype or stored_dtype(sd)
        if not strict and compare_keys(module, sd).missing:  # cannot stay on meta: build it for real
            module = get_component(component).build(part_cfg).to(device=device, dtype=want)
            _replace_part(bundle, name, module)
        n = sum(v.numel() for v in sd.values())
        say(f"loading {name}: {len(sd)} tensors, {n:,} values -> {str(want).removeprefix('torch.')} on {device}")
        bundle.load_reports[name] = load_into(module, sd, strict=strict, dtype=want, device=device,
                                              source=f"{source} [{name}]")  # fmt: skip
        del sd
    leftover = [n for n, t in list(bundle.named_parameters()) + list(bundle.named_buffers()) if t.is_meta]
    if leftover:  # a network with state that no checkpoint holds (e.g. a non-persistent buffer)
        raise CheckpointError(f"{source}: left on the meta device after loading: {', '.join(leftover[:10])}")
    return bundle.eval()


def _replace_part(bundle: Bundle, name: str, module: nn.Module) -> None:
    if name.startswith("text."):
        bundle.text[int(name.split(".")[1])] = module
    else:
        setattr(bundle, name, module)


def stored_dtype(sd: dict[str, Tensor]) -> torch.dtype:
    """The floating dtype a state dict is stored in; float32 if it mixes several (or has none)."""
    found = {v.dtype for v in sd.values() if v.is_floating_point()}
    return found.pop() if len(found) == 1 else torch.float32


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype: expected None, a floating torch.dtype or one of {', '.join(DTYPES)}, got {dtype!r}")


# ------------------------------------------------------------------------------------------------ save


def save_bundle(bundle: Bundle, path: str | os.PathLike, format: str = "ldm", progress: Progress | None = None) -> None:
    """Write ``bundle`` as ``format``: "ldm" (folder: model.safetensors + config.yaml), "original" (one
    .safetensors file in the original LDM / SGM layout) or "diffusers" (a diffusers pipeline folder).
    Writes are atomic: a failure leaves no complete-looking output and keeps an older one intact."""
    if format not in FORMATS:
        raise ValueError(f"format: unknown {format!r}; one of: {', '.join(FORMATS)}")
    if bundle.conditions is not None and format != "ldm":
        raise ValueError(f"format: {format!r} has no place for this model's conditions "
                         f"({', '.join(bundle.conditions.names())}); save it with format='ldm'")  # fmt: skip
    say = progress or (lambda msg: None)
    parts = {name: {k: v.detach().to("cpu") for k, v in m.state_dict().items()} for name, m in bundle.parts().items()}
    say(f"writing {path} ({FORMATS[format].DESCRIPTION})")
    FORMATS[format].write(bundle.config, parts, Path(path), progress=say)
