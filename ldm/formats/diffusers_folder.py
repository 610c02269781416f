"""diffusers pipeline folders: ``model_index.json`` + one sub-folder per component.

    unet/            config.json + diffusion_pytorch_model.safetensors     UNet2DConditionModel
    vae/             config.json + diffusion_pytorch_model.safetensors     AutoencoderKL
    text_encoder/    config.json + model.safetensors                       transformers CLIPTextModel
    text_encoder_2/  (SDXL)                                                CLIPTextModelWithProjection
    scheduler/       scheduler_config.json                                 schedule and prediction_type

Weights are read from ``*.safetensors``, sharded ``*.safetensors.index.json``, the ``.fp16`` variants, and as a
last resort ``*.bin`` pickles through ``torch.load(weights_only=True)``, which refuses pickles that run code.
Key and config translations are the components' own (ldm/components.py); the pipeline family decides how the
text towers are read, as diffusers' pipelines read them:

    sd1, sd2   text_encoder's last_hidden_state (final layer norm applied); no pooled vector
    sdxl       hidden_states[-2] of both encoders, no final norm; pooled = text_encoder_2's text_embeds

So SD 2.x, which reads the penultimate layer of OpenCLIP ViT-H, is stored by diffusers as a 23-layer CLIPTextModel
without text_projection; writing a 24-layer SD 2.x tower here drops the unused last block and projection the same
way (as diffusers' own single-file converter does). Tokenizer folders are not written (see the report in
``write``'s docstring); pipelines need ``tokenizer=`` passed to ``from_pretrained``.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from torch import Tensor

from ..checkpoint import CheckpointError, read_state_dict, write_safetensors
from ..components import get_component
from ..config import ConfigError
from ..model_config import ModelConfig, load_model_config
from ..schedule import BETA_SCHEDULES
from ..text_config import PAD_OPENAI, PAD_OPENCLIP, TextEncoderConfig
from .native import atomic_folder, write_json

NAME = "diffusers"
DESCRIPTION = "diffusers folder"
DIFFUSERS_VERSION = "0.30.0"  # written into config files; the formats read here have been stable since
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}  # diffusers -> ours
PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
SAMPLE_SIZE = {"sd1": 64, "sd2": 96, "sdxl": 128}  # default latent size of the published models
WEIGHT_NAMES = ("diffusion_pytorch_model", "model")
PICKLE_NAMES = ("diffusion_pytorch_model", "pytorch_model")

StateDict = dict[str, Tensor]


# ------------------------------------------------------------------------------------------------ read


def read(path: Path, *, family=None, prediction=None, overrides=(), strict=True, progress=None):
    """(ModelConfig, {part: state dict in our layout}) from a diffusers pipeline folder."""
    index = _json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    folders = ["text_encoder", "text_encoder_2"] if (path / "text_encoder_2").is_dir() else ["text_encoder"]
    configs = {name: _json(path / name / "config.json") for name in ["unet", "vae"] + folders}
    fam = family or _family(index, configs)
    if fam not in PIPELINES:
        raise CheckpointError(f"{path}: family {fam!r} cannot be read from a diffusers folder; one of: "
                              f"{', '.join(PIPELINES)}")  # fmt: skip
    want_towers = 2 if fam == "sdxl" else 1
    if len(folders) != want_towers:
        raise CheckpointError(f"{path}: a {fam} pipeline has {want_towers} text encoder folder(s), found {folders}")
    try:
        data = {
            "family": fam,
            "diffusion": _diffusion(path, fam),
            "unet": get_component("unet").config_from_diffusers(configs["unet"]),
            "vae": get_component("vae").config_from_diffusers(configs["vae"]),
            "text": [_tower(get_component("text").config_from_diffusers(configs[f]), fam, i) for i, f in enumerate(folders)],
        }
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    extra = ([f"diffusion.prediction={prediction}"] if prediction else []) + list(overrides)
    try:
        cfg = load_model_config(data, extra)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None

    parts = {}
    for (name, component, part_cfg), folder in zip(cfg.parts(), ["unet", "vae"] + folders):
        sd = read_weights(path / folder)
        try:
            parts[name] = get_component(component).from_diffusers(sd, part_cfg)
        except ValueError as e:
            raise CheckpointError(f"{path / folder}: {e}") from None
    return cfg, parts


def _json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (expected in a diffusers folder)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _family(index: dict, configs: dict) -> str:
    if "XL" in index.get("_class_name", "") or "text_encoder_2" in configs:
        return "sdxl"
    return "sd2" if configs["text_encoder"].get("hidden_act") == "gelu" else "sd1"  # OpenCLIP H vs OpenAI L


def _tower(fields: dict, family: str, index: int) -> dict:
    """How the family's diffusers pipeline reads this tower (see the module docstring)."""
    if family == "sdxl":
        read = dict(layer="penultimate", final_norm=False, return_pooled=index == 1,
                    pad_id=PAD_OPENAI if index == 0 else PAD_OPENCLIP)  # fmt: skip
    else:
        read = dict(layer="last", final_norm=True, return_pooled=False, pad_id=PAD_OPENAI if family == "sd1" else PAD_OPENCLIP)
    return {**fields, **read}


def _diffusion(path: Path, family: str) -> dict:
    file = path / "scheduler" / "scheduler_config.json"
    default = "v" if family == "sd2" else "eps"
    if not file.is_file():
        return {"prediction": default}
    d = _json(file)
    problems = []
    if d.get("trained_betas") is not None:
        problems.append("trained_betas (an explicit beta list) is not supported")
    if d.get("beta_schedule", "scaled_linear") not in BETA_SCHEDULES:
        problems.append(f"beta_schedule={d.get('beta_schedule')!r} (supported: {', '.join(BETA_SCHEDULES)})")
    if d.get("prediction_type", "epsilon") not in PREDICTIONS:
        problems.append(f"prediction_type={d.get('prediction_type')!r} (supported: {', '.join(PREDICTIONS)})")
    if problems:
        raise CheckpointError(f"{file}: " + "; ".join(problems))
    schedule = {k: d[k] for k in ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps") if k in d}
    schedule["zero_terminal_snr"] = bool(d.get("rescale_betas_zero_snr", False))
    return {"prediction": PREDICTIONS[d["prediction_type"]] if "prediction_type" in d else default, "schedule": schedule}


def read_weights(folder: Path) -> StateDict:
    """The tensors of one component folder (see the module docstring for the files looked for)."""
    tried = []
    for variant in ("", ".fp16"):
        for base in WEIGHT_NAMES:
            file = folder / f"{base}{variant}.safetensors"
            if file.is_file():
                return read_state_dict(file)
            index = folder / f"{base}{variant}.safetensors.index.json"
            if index.is_file():
                return _read_sharded(index)
            tried += [file.name, index.name]
    for base in PICKLE_NAMES:
        file, index = folder / f"{base}.bin", folder / f"{base}.bin.index.json"
        if file.is_file():
            return read_state_dict(file)  # weights_only: a pickle that would run code is refused
        if index.is_file():
            return _read_sharded(index)
        tried += [file.name, index.name]
    raise CheckpointError(f"{folder}: no weights found (looked for {', '.join(tried)})")


def _read_sharded(index: Path) -> StateDict:
    weight_map = _json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no weight_map")
    out: StateDict = {}
    for shard in sorted(set(weight_map.values())):
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise CheckpointError(f"{index}: shard {shard!r} is not a file name in this folder")
        out.update(read_state_dict(index.parent / shard))
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise CheckpointError(f"{index}: {len(missing)} tensor(s) listed but not in their shards: {', '.join(missing[:10])}")
    return out


# ----------------------------------------------------------------------------------------------- write


def write(cfg: ModelConfig, parts: dict[str, StateDict], path: Path, progress=None) -> None:
    """A diffusers pipeline folder that ``DiffusionPipeline`` / the component classes' ``from_pretrained`` load.

    Not written: tokenizer folders (vocab.json / merges.txt; this library tokenizes with open_clip's BPE table) and
    the safety checker. Pass ``tokenizer=`` (and ``tokenizer_2=``) to ``StableDiffusion[XL]Pipeline.from_pretrained``.
    """
    if cfg.family not in PIPELINES:
        raise CheckpointError(f"{path}: a {cfg.family!r} model has no diffusers pipeline; families: {', '.join(PIPELINES)}")
    if cfg.diffusion.time_input != "timestep":
        raise CheckpointError(f"{path}: diffusers' schedulers feed discrete timesteps; diffusion.time_input="
                              f"{cfg.diffusion.time_input!r} cannot be written")  # fmt: skip
    towers = [_diffusers_tower(t, parts[f"text.{i}"], cfg.family, i, path) for i, t in enumerate(cfg.text)]
    folders = ["text_encoder", "text_encoder_2"][: len(towers)]
    index = {"_class_name": PIPELINES[cfg.family], "_diffusers_version": DIFFUSERS_VERSION}
    with atomic_folder(path, looks_like=is_diffusers_folder) as tmp:
        items = [("unet", "unet", cfg.unet, parts["unet"]), ("vae", "vae", cfg.vae, parts["vae"])]
        items += [(folder, "text", t, sd) for folder, (t, sd) in zip(folders, towers)]
        for folder, component, part_cfg, sd in items:
            spec = get_component(component)
            config = spec.config_to_diffusers(part_cfg)
            if "_class_name" in config:  # a diffusers model
                config = {**config, "_diffusers_version": DIFFUSERS_VERSION}
                config["sample_size"] = SAMPLE_SIZE[cfg.family] * (cfg.vae.downsample_factor if folder == "vae" else 1)
                index[folder], weights = ["diffusers", config["_class_name"]], "diffusion_pytorch_model.safetensors"
            else:  # a transformers model
                index[folder], weights = ["transformers", config["architectures"][0]], "model.safetensors"
            write_json(config, tmp / folder / "config.json")
            write_safetensors(spec.to_diffusers(sd, part_cfg), tmp / folder / weights, metadata={"format": "pt"})
        write_json(_scheduler_config(cfg), tmp / "scheduler" / "scheduler_config.json")
        index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
        for name in ("tokenizer", "tokenizer_2")[: len(towers)]:
            index[name] = [None, None]
        if cfg.family == "sdxl":
            index["force_zeros_for_empty_prompt"] = True
        else:
            index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
        write_json(index, tmp / "model_index.json")


def is_diffusers_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file()


def _diffusers_tower(t: TextEncoderConfig, sd: StateDict, family: str, i: int, path: Path):
    """(tower config, state dict) as the family's diffusers pipeline reads it: SD 1.x / 2.x read the last hidden
    state after the final norm, so a tower read at block k < L keeps its first k blocks only."""
    k = t.layer_index()
    if family == "sdxl":
        want = (k == t.layers - 1 and not t.final_norm and t.return_pooled == (i == 1))
        if not want:
            raise CheckpointError(f"{path}: text tower {i} is not read as diffusers' SDXL pipeline reads it "
                                  f"(penultimate layer, no final norm, pooled from the second tower)")  # fmt: skip
        return t, sd
    if not t.final_norm or k == 0 or t.return_pooled:
        raise CheckpointError(f"{path}: text tower {i} (layer {t.layer!r}, final_norm={t.final_norm}, return_pooled="
                              f"{t.return_pooled}) is not what diffusers' {family} pipeline reads: the last hidden "
                              f"state after the final layer norm")  # fmt: skip
    if k == t.layers and t.projection_dim is None:
        return t, sd
    keep = {k2: v for k2, v in sd.items() if k2 != "text_projection" and not _block_at_or_after(k2, k)}
    return dataclasses.replace(t, layers=k, layer="last", projection_dim=None), keep


def _block_at_or_after(key: str, k: int) -> bool:
    parts = key.split(".")
    return parts[:2] == ["transformer", "resblocks"] and int(parts[2]) >= k


def _scheduler_config(cfg: ModelConfig) -> dict:
    s = cfg.diffusion.schedule
    back = {v: k for k, v in PREDICTIONS.items()}
    return {
        "_class_name": "EulerDiscreteScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": s.num_train_timesteps,
        "beta_start": s.beta_start,
        "beta_end": s.beta_end,
        "beta_schedule": s.beta_schedule,
        "trained_betas": None,
        "prediction_type": back[cfg.diffusion.prediction],
        "rescale_betas_zero_snr": s.zero_terminal_snr,
        "timestep_spacing": "leading",
        "steps_offset": 1,
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
    }
