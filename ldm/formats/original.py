"""The original single-file layout (CompVis / Stability ``ldm`` and ``sgm``): one file, one prefix per network.

    model.diffusion_model.*     U-Net (our names: prefix stripped)
    first_stage_model.*         VAE (our names; training-only loss.* dropped)
    cond_stage_model.* / conditioner.embedders.{i}.*   text towers (see ldm/formats/detect.py for the layouts)

Also found in such files and dropped on reading, being no part of the networks: the LatentDiffusion schedule
buffers (``betas``, ``alphas_cumprod``, ``posterior_*`` ...), EMA copies (``model_ema.*``), ``denoiser.*`` tables,
open_clip's ``logit_scale`` and transformers' ``position_ids``. Markers: a ``v_pred`` entry means v prediction,
``ztsnr`` a zero-terminal-SNR schedule (the convention of ComfyUI and others).

The config comes from the tensor shapes and the family's conventions (detect.py), and the prediction type from
the ``v_pred`` marker, else the family (SD 2.x: v, others: eps); the caller's family / prediction / overrides win.
Files we write carry their exact ModelConfig as YAML in the safetensors metadata (``ldm.config``), which is then
used instead of the conventions, and the markers where a reader without that metadata would guess wrong
(``v_pred`` for a v model outside SD 2.x, ``ztsnr``). Writing is the exact inverse of reading: original -> ours ->
original gives back every network tensor bit for bit under the same key.
"""
from __future__ import annotations

from pathlib import Path

import torch
import yaml
from torch import Tensor

from ..checkpoint import CheckpointError, read_metadata, read_state_dict, write_safetensors
from ..components import get_component
from ..config import ConfigError, parse_overrides, to_yaml
from ..model_config import ModelConfig, load_model_config
from .detect import (
    UNET_PREFIX, VAE_PREFIX, OriginalLayout, original_layout, text_from_shapes, tower_presets, unet_from_shapes,
    vae_from_shapes, writing_layout,
)  # fmt: skip

NAME = "original"
DESCRIPTION = "original single-file checkpoint"
CONFIG_METADATA = "ldm.config"  # safetensors metadata key holding the ModelConfig YAML in files we write
MARKERS = ("v_pred", "ztsnr")
SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights",
})  # fmt: skip
DROPPED_PREFIXES = ("model_ema.", "denoiser.")

StateDict = dict[str, Tensor]


# ------------------------------------------------------------------------------------------------ read


def read(path: Path, *, family=None, prediction=None, overrides=(), strict=True, progress=None):
    """(ModelConfig, {part: state dict in our layout}) from an original single file."""
    say = progress or (lambda msg: None)
    source = str(path)
    sd = read_state_dict(path)
    meta = read_metadata(path) if path.suffix == ".safetensors" else {}
    layout = original_layout(sd.keys(), source)
    groups, markers, dropped, unexpected = split(sd, layout)
    del sd
    if unexpected:
        shown = ", ".join(unexpected[:10]) + (f" ... ({len(unexpected)} in all)" if len(unexpected) > 10 else "")
        if strict:
            raise CheckpointError(f"{source}: entries that belong to no network of a {layout.family} model: {shown}")
        say(f"ignoring {len(unexpected)} unexpected entries: {shown}")
    if dropped:
        say(f"ignoring {len(dropped)} non-network entries (schedule buffers, EMA copies ...)")
    for part in ("unet", "vae"):
        if not groups[part]:
            prefix = UNET_PREFIX if part == "unet" else VAE_PREFIX
            raise CheckpointError(f"{source}: no {prefix}* weights: this file lacks the {part}")

    fam = family or layout.family
    if CONFIG_METADATA in meta:  # written by us: the exact config
        try:
            data, unknown = yaml.safe_load(meta[CONFIG_METADATA]), []
        except yaml.YAMLError as e:
            raise CheckpointError(f"{source}: unreadable {CONFIG_METADATA} metadata ({e})") from None
    else:
        data, unknown = config_from_shapes(groups, layout, fam, markers, source)
    extra = ([f"family={family}"] if family else []) + ([f"diffusion.prediction={prediction}"] if prediction else [])
    overrides = extra + list(overrides)
    _check_unknown(unknown, overrides, fam, source)
    try:
        cfg = load_model_config(data, overrides)
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None
    if len(cfg.text) != len(layout.towers):
        raise CheckpointError(f"{source}: the config has {len(cfg.text)} text tower(s), the file "
                              f"{len(layout.towers)}: {', '.join(p for p, _ in layout.towers)}")  # fmt: skip

    parts = {}
    for (name, component, part_cfg), (_, lay) in zip(cfg.parts(), [("", "ldm")] * 2 + layout.towers):
        spec = get_component(component)
        try:
            parts[name] = spec.original_map(lay, "from")(groups.pop(name), part_cfg)
        except ValueError as e:
            raise CheckpointError(f"{source} [{name}]: {e}") from None
    return cfg, parts


def split(sd: StateDict, layout: OriginalLayout) -> tuple[dict[str, StateDict], set[str], list[str], list[str]]:
    """({part: tensors with the prefix stripped}, markers found, dropped keys, unexpected keys)."""
    prefixes = [(UNET_PREFIX, "unet"), (VAE_PREFIX, "vae")] + [(p, f"text.{i}") for i, (p, _) in enumerate(layout.towers)]
    groups: dict[str, StateDict] = {part: {} for _, part in prefixes}
    markers, dropped, unexpected = set(), [], []
    for k, v in sd.items():
        part = next(((p, name) for p, name in prefixes if k.startswith(p)), None)
        if part is not None:
            groups[part[1]][k[len(part[0]) :]] = v
        elif k in MARKERS:
            markers.add(k)
        elif k in SCHEDULE_BUFFERS or k.startswith(DROPPED_PREFIXES):
            dropped.append(k)
        else:
            unexpected.append(k)
    return groups, markers, dropped, sorted(unexpected)


def config_from_shapes(groups: dict[str, StateDict], layout: OriginalLayout, family: str, markers: set[str],
                       source: str) -> tuple[dict, list[str]]:  # fmt: skip
    """ModelConfig data read from the tensor shapes with the family's conventions, and the unreadable keys."""
    presets = tower_presets(family, layout, has_vector="label_emb.0.0.weight" in groups["unet"])
    if len(presets) != len(layout.towers):
        raise CheckpointError(f"{source}: family {family!r} has {len(presets)} text tower(s), the file "
                              f"{len(layout.towers)}: {', '.join(p for p, _ in layout.towers)}")  # fmt: skip
    unet, unknown = unet_from_shapes(groups["unet"], family, source)
    vae, more = vae_from_shapes(groups["vae"], family, source, sgm=layout.towers[0][0].startswith("conditioner."))
    unknown += more
    text = []
    for i, ((_, lay), preset) in enumerate(zip(layout.towers, presets)):
        tower, more = text_from_shapes(groups[f"text.{i}"], lay, preset, i, source)
        text.append(tower)
        unknown += more
    prediction = "v" if "v_pred" in markers or family == "sd2" else "eps"
    diffusion = {"prediction": prediction, "schedule": {"zero_terminal_snr": "ztsnr" in markers}}
    return {"family": family, "diffusion": diffusion, "unet": unet, "vae": vae, "text": text}, unknown


def _check_unknown(unknown: list[str], overrides: list[str], family: str, source: str) -> None:
    given = [key for key, _ in parse_overrides(overrides)]
    for key in unknown:
        heads = key.startswith("unet.num_head")  # either way of giving the U-Net's heads will do
        if any(g == key or (heads and g.startswith("unet.num_head")) for g in given):
            continue
        raise CheckpointError(
            f"{source}: cannot read {key} from the tensor shapes: the {family} convention does not divide this "
            f"model's widths (a small or unusual model?). Pass it: config_overrides=['{key}=N'] (ldm convert: "
            f"--set {key}=N)"
        )


# ----------------------------------------------------------------------------------------------- write


def write(cfg: ModelConfig, parts: dict[str, StateDict], path: Path, progress=None) -> None:
    """One .safetensors file in the original layout (see the module docstring), written atomically."""
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: the original format is written as a .safetensors file (pickled .ckpt files "
                              f"are not written: checkpoints are data, not code)")  # fmt: skip
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected a .safetensors file name")
    towers = writing_layout(cfg.family, cfg.text)
    out: StateDict = {}
    for (name, component, part_cfg), (prefix, lay) in zip(cfg.parts(), [(UNET_PREFIX, "ldm"), (VAE_PREFIX, "ldm")] + towers):
        mapped = get_component(component).original_map(lay, "to")(parts[name], part_cfg)
        out.update((prefix + k, v) for k, v in mapped.items())
    if cfg.diffusion.prediction == "v" and cfg.family != "sd2":
        out["v_pred"] = torch.zeros(0)
    if cfg.diffusion.schedule.zero_terminal_snr:
        out["ztsnr"] = torch.zeros(0)
    write_safetensors(out, path, metadata={"format": "pt", CONFIG_METADATA: to_yaml(cfg)})
