"""``ldm export CHECKPOINT OUT``: a training checkpoint to a model you can sample from (or just its LoRA file).

    ldm export runs/tiny out/tiny-ema                        # latest checkpoint of a run, EMA weights if it has them
    ldm export runs/tiny/checkpoints/step-00000500 out.safetensors --weights raw --dtype fp16   # original single file
    ldm export runs/lora lora.safetensors --lora-only --weights ema                           # the adapters alone
    path = export_checkpoint("runs/tiny", "out/tiny", weights="ema", to="diffusers")           # from Python

CHECKPOINT is a run's output_dir (its latest complete checkpoint), its ``checkpoints/`` folder (the same), or one
step folder (training/checkpointing.py describes the layout). What happens, in this order:

1. Every argument is checked, and the checkpoint found and checked complete (``state.json``, written last), before
   any model is built: a wrong path, an incomplete folder, ``--weights ema`` without EMA state, an existing OUT
   without ``--overwrite`` are one-line errors.
2. The base model is rebuilt from the checkpoint's ``config.yaml`` exactly as the trainer built it
   (``training.train.build_bundle``: the seeded random init of a from-scratch run, or ``model.source`` of a
   fine-tune, which must still exist). The data is not read, so ``data.source`` and ``resume`` of that config
   are replaced by neutral values (they may name paths gone since), with one exception: a ``task: vae`` run with
   ``vae_fit_scale`` (the default) wrote ``1 / std`` of its latents on the training images into the saved VAE
   config (training/vae_task.py); that scale is in no checkpoint, so export measures it again, on the same data
   with the same function, for the weights it exports.
3. LoRA runs: adapters are injected as in training (``cfg.lora``: rank, alpha, target modules).
4. The trained tensors are loaded: ``model.safetensors`` (raw) or the EMA shadows (``ema.safetensors/.json``),
   through the trainer's own ``Trainable`` / ``EMA`` objects, so names mean exactly what they meant in training.
   Names are ``<component>.<param>`` with component ``unet``, ``text`` or ``vae``; ``disc.*`` (the VAE's
   discriminator) belongs to no model and is skipped.
5. LoRA: merged into the base weights (``ldm.lora.merge_lora``), or with ``--lora-only`` written alone, as the
   trainer writes ``lora.safetensors`` (same keys and metadata).
6. Written with ``ldm.bundle.save_bundle`` in the chosen format (the writers of ``ldm convert``).

Dtypes: a network that holds trained tensors is written in their dtype (fp32; a LoRA base is promoted to it
before merging), frozen networks as the base stores them, unless ``--dtype`` casts everything. So the export of a
run's final checkpoint equals its ``model/`` (``--weights raw``) or ``model-ema/`` (``--weights ema``) bit for bit
for ``mixed_precision=no``; with fp16 / bf16 the trainer writes frozen networks (and a LoRA base) in the compute
dtype, while export keeps them as stored.

This module imports only argparse and pathlib at import time (``ldm --help`` loads every command); torch and the
trainer are imported when an export runs.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

WEIGHTS = ("ema", "raw")
FORMATS = ("ldm", "diffusers", "original")
DTYPES = ("fp32", "fp16", "bf16")
COMPONENTS = ("unet", "text", "vae", "conditions")  # Bundle attributes whose parameters a checkpoint may hold
IGNORED = ("disc",)  # trained alongside but part of no bundle (the VAE's GAN discriminator)
# settings of a checkpoint's config that rebuilding its model does not need, and that may name paths gone since
NO_RESUME, NO_DATA = "resume=never", "data.source=shapes"

Progress = Callable[[str], None]

DESCRIPTION = """\
Export a training checkpoint as a model (ldm folder, diffusers folder or original .safetensors file), with
its EMA or its raw weights; or, for a LoRA run, the adapters alone.

CHECKPOINT is a run's output_dir or its checkpoints/ folder (the latest complete checkpoint is taken), or
one checkpoints/step-XXXXXXXX folder. The base model is rebuilt from the checkpoint's config.yaml (the same
seeded init, or the same model.source, which must still exist), the trained weights are loaded into it, LoRA
adapters are merged, and the result is written to OUT.

  ldm export runs/tiny out/tiny                          # EMA weights if the run kept an EMA, else raw
  ldm export runs/tiny/checkpoints/step-00000500 sd.safetensors --weights raw --dtype fp16
  ldm export runs/lora lora.safetensors --lora-only      # LoRA runs: only the adapters (ldm.lora key names)

Everything is checked before any model is built: an incomplete checkpoint (no state.json), a folder that is
not a checkpoint, --weights ema without EMA state, or an existing OUT without --overwrite is an error."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a training checkpoint as a model (EMA or raw weights, LoRA merged or alone)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a run's output_dir, its checkpoints/ folder, or a step folder")
    p.add_argument("output", metavar="OUT",
                   help="output folder (ldm, diffusers) or .safetensors file (original, --lora-only)")
    p.add_argument("--weights", choices=WEIGHTS, default=None,
                   help="ema: the EMA shadows; raw: the trained weights (default: ema where the checkpoint has "
                   "EMA state)")
    p.add_argument("--to", choices=FORMATS, default=None,
                   help="output format (default: original if OUT ends in .safetensors, else ldm)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="cast every network (default: trained networks fp32, frozen ones as the base stores them)")
    p.add_argument("--lora-only", action="store_true",
                   help="LoRA runs: write only the adapters to OUT (.safetensors), as the trainer's lora.safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (a model of the same format)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress messages")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    say = (lambda msg: None) if args.quiet else _progress(time.monotonic())
    export_checkpoint(args.checkpoint, args.output, weights=args.weights, to=args.to, dtype=args.dtype,
                      lora_only=args.lora_only, overwrite=args.overwrite, progress=say)  # fmt: skip
    return 0


def _progress(started: float) -> Progress:
    def say(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    return say


# ------------------------------------------------------------------------------------------------- export


def export_checkpoint(
    checkpoint, out, weights: str | None = None, to: str | None = None, dtype: str | None = None, *,
    lora_only: bool = False, overwrite: bool = False, progress: Progress | None = None,
) -> Path:  # fmt: skip
    """Export ``checkpoint`` to ``out``; returns ``out`` as a Path. See the module docstring.

    weights: "ema" | "raw" | None (ema where the checkpoint has EMA state). to: "ldm" | "diffusers" | "original" |
    None (original for a .safetensors OUT, else ldm). dtype: "fp32" | "fp16" | "bf16" | None. ValueError
    (CheckpointError) naming the argument or file for bad input, raised before any model is built."""
    say = progress or (lambda msg: None)
    for name, value, allowed in (("weights", weights, WEIGHTS), ("to", to, FORMATS), ("dtype", dtype, DTYPES)):
        if value is not None and value not in allowed:
            raise ValueError(f"{name}: unknown value {value!r}; one of: {', '.join(allowed)}")
    out = Path(out)
    step = find_checkpoint(checkpoint)
    to = _check_output(out, to, lora_only, overwrite)
    has_ema = (step / "ema.json").is_file() and (step / "ema.safetensors").is_file()
    weights = weights or ("ema" if has_ema else "raw")
    if weights == "ema" and not has_ema:
        raise ValueError(f"{step}: has no EMA state (ema.safetensors / ema.json); the run kept no EMA: "
                         f"use --weights raw")  # fmt: skip
    cfg = _train_config(step, need_data=False)
    fit_scale = cfg.task == "vae" and cfg.vae_fit_scale
    if fit_scale:
        cfg = _train_config(step, need_data=True)
    if lora_only and cfg.lora is None:
        raise ValueError(f"--lora-only: {step} is not a LoRA run (its config.yaml has lora: null)")

    from . import checkpointing as ckpt

    state = ckpt.read_train_state(step)
    what = "EMA" if weights == "ema" else "raw"
    say(f"checkpoint {step} (step {state.step}): {what} weights; rebuilding the base model from "
        f"{'a seeded random init' if cfg.model.from_scratch else cfg.model.source}")  # fmt: skip

    import torch

    from ldm.bundle import DTYPES as TORCH_DTYPES
    from ldm.bundle import save_bundle
    from ldm.checkpoint import write_safetensors
    from ldm.lora import lora_state_dict, merge_lora

    from . import train as train_mod
    from .finish import lora_metadata

    with torch.random.fork_rng(devices=[]):  # build_bundle seeds the global RNG; leave the caller's as it was
        bundle = train_mod.build_bundle(cfg)
    trained = _load_trained(bundle, cfg, step, weights, say)
    if fit_scale:
        _fit_vae_scale(bundle, cfg, say)
    if lora_only:
        sd = lora_state_dict(bundle.unet)
        if dtype is not None:  # alpha stays fp32, as lora_state_dict makes it
            sd = {k: v if k.endswith(".alpha") else v.to(TORCH_DTYPES[dtype]) for k, v in sd.items()}
        write_safetensors(sd, out, metadata=lora_metadata(cfg.lora))
        say(f"done: {len(sd) // 3} LoRA adapters ({what}) of {step} -> {out}")
        return out
    if cfg.lora is not None:
        merged = merge_lora(bundle.unet)
        say(f"merged {len(merged)} LoRA adapters (rank {cfg.lora.rank}, alpha {cfg.lora.alpha:g}) into the U-Net")
    if dtype is not None:
        bundle.to(TORCH_DTYPES[dtype])
    with torch.no_grad():
        save_bundle(bundle, out, format=to, progress=say)
    say(f"done: {what} weights of {step} ({', '.join(trained)}) -> {out} ({to})")
    return out


# ------------------------------------------------------------------------------------------------- checks


def find_checkpoint(path) -> Path:
    """The complete step folder that ``path`` designates (see the module docstring); ValueError naming it."""
    from . import checkpointing as ckpt

    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such folder")
    if not path.is_dir():
        raise ValueError(f"{path}: is a file; CHECKPOINT is a run's output_dir, its checkpoints/ folder or a "
                         f"step folder")
    stepish = ckpt.STEP_DIR.match(path.name) or path.name.startswith(".tmp-step-")
    if (path / ckpt.COMPLETE_MARKER).is_file() or stepish:
        if not (path / ckpt.COMPLETE_MARKER).is_file():
            raise ValueError(f"{path}: incomplete checkpoint (no {ckpt.COMPLETE_MARKER}, which is written last: the "
                             f"run stopped while saving it); use an earlier step folder")  # fmt: skip
        for name in ("model.safetensors", "config.yaml"):
            if not (path / name).is_file():
                raise ValueError(f"{path}: not a training checkpoint ({name} is missing)")
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = [p for p in root.iterdir() if p.is_dir() and ckpt.STEP_DIR.match(p.name)]
    if (root / ckpt.LATEST).is_file() or steps:
        found = ckpt.find_latest(root)
        if found is None:
            raise ValueError(f"{root}: no complete checkpoint (every step folder lacks {ckpt.COMPLETE_MARKER})")
        return found
    raise ValueError(f"{path}: not a training checkpoint, checkpoints/ folder or run output_dir (no "
                     f"{ckpt.COMPLETE_MARKER}, no checkpoints/, no step-XXXXXXXX folders); to convert a model "
                     f"folder use 'ldm convert'")  # fmt: skip


def _check_output(out: Path, to: str | None, lora_only: bool, overwrite: bool) -> str | None:
    """The output format (None for --lora-only); ValueError for an OUT that cannot or may not be written."""
    if lora_only:
        if to is not None:
            raise ValueError("--to: not with --lora-only, which writes the adapters alone (ldm.lora key names)")
        return _check_file(out, overwrite, "--lora-only")
    to = to or ("original" if out.suffix == ".safetensors" else "ldm")
    if to == "original":
        _check_file(out, overwrite, "--to original")
        return to
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is a file; --to {to} writes a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out}: exists and is not empty; pass --overwrite to replace it")
        from ldm.formats import FORMATS as WRITERS

        looks_like = WRITERS[to].is_ldm_folder if to == "ldm" else WRITERS[to].is_diffusers_folder
        if not looks_like(out):
            raise ValueError(f"{out}: exists and is not a model folder of the {to} format; refusing to replace it")
    return to


def _check_file(out: Path, overwrite: bool, flag: str) -> None:
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: {flag} writes one .safetensors file; name OUT *.safetensors")
    if out.is_dir():
        raise ValueError(f"{out}: is a folder; {flag} writes one .safetensors file")
    if out.exists() and not overwrite:
        raise ValueError(f"{out}: exists; pass --overwrite to replace it")


def _train_config(step: Path, need_data: bool):
    """The TrainConfig of the run that wrote ``step``; errors name its config.yaml."""
    from ldm.config import ConfigError

    from .config import load_train_config

    path = step / "config.yaml"
    try:
        return load_train_config(path, [NO_RESUME] + ([] if need_data else [NO_DATA]))
    except (ConfigError, ValueError) as e:
        why = (" (task=vae with vae_fit_scale: export measures the latent scale on the training data again, so "
               "it must be where the run read it)") if need_data else ""  # fmt: skip
        raise ValueError(f"{path}: {e}{why}") from None


def _fit_vae_scale(bundle, cfg, say: Progress) -> None:
    """task=vae: the saved VAE's scale_factor, 1 / std of its latents on the training images, as the trainer fits it."""
    import dataclasses

    import torch

    from .train_data import train_rows
    from .vae_task import fit_scale_factor

    was = bundle.vae.training
    bundle.vae.eval()
    scale = fit_scale_factor(bundle.vae, train_rows(cfg, eval_transform=True), cfg.batch_size, "cpu", torch.float32)
    bundle.vae.train(was)
    vae = dataclasses.replace(bundle.config.vae, scale_factor=scale)
    bundle.config = dataclasses.replace(bundle.config, vae=vae)
    say(f"latent scale_factor = 1 / std(z) on {cfg.data.source}: {scale:.5f}")


# ------------------------------------------------------------------------------------------------ loading


def _load_trained(bundle, cfg, step: Path, weights: str, say: Progress) -> list[str]:
    """Put the checkpoint's trained tensors (raw or EMA) into ``bundle``; returns the components touched."""
    import torch
    from torch import nn

    from ldm.checkpoint import CheckpointError, read_state_dict
    from ldm.ema import EMA
    from ldm.lora import inject_lora

    from . import checkpointing as ckpt
    from .train import Trainable

    file = step / "model.safetensors"
    tensors = read_state_dict(file)  # {"unet.<param>" | "text.<i>.<param>" | "vae.<param>" | "disc.<param>": tensor}
    groups: dict[str, list[str]] = {}
    for key in tensors:
        groups.setdefault(key.split(".", 1)[0], []).append(key)
    unknown = sorted(set(groups) - set(COMPONENTS) - set(IGNORED))
    if unknown:
        raise CheckpointError(f"{file}: tensors of unknown components {unknown} (e.g. {groups[unknown[0]][0]!r}); "
                              f"expected {', '.join(COMPONENTS)} (and {', '.join(IGNORED)}, skipped)")  # fmt: skip
    trained = [c for c in COMPONENTS if c in groups]
    if not trained:
        raise CheckpointError(f"{file}: holds no tensors of {', '.join(COMPONENTS)}")
    for c in trained:  # a trained network is written in the dtype it was trained in (fp32)
        module = getattr(bundle, c)
        want = torch.promote_types(next(module.parameters()).dtype, tensors[groups[c][0]].dtype)
        module.to(want)
    if cfg.lora is not None:
        inject_lora(bundle.unet, cfg.lora, dtype=torch.float32)
    params = {f"{c}.{n}": p for c in COMPONENTS if getattr(bundle, c, None) is not None
              for n, p in getattr(bundle, c).named_parameters()}  # fmt: skip
    named: dict[str, nn.Parameter] = {}
    for key, value in tensors.items():
        if key.split(".", 1)[0] in IGNORED:
            named[key] = nn.Parameter(torch.empty_like(value), requires_grad=False)  # a placeholder, never written
            continue
        p = params.get(key)
        if p is None:
            raise CheckpointError(f"{file}: {key} is not a parameter of the model rebuilt from {step / 'config.yaml'}")
        if p.shape != value.shape:
            raise CheckpointError(f"{file}: {key} has shape {tuple(value.shape)}, the model {tuple(p.shape)}")
        named[key] = p
    adapters = [k for k in params if ".lora_" in k]
    missing = sorted(set(adapters) - set(named))
    if missing:
        raise CheckpointError(f"{file}: {len(missing)} LoRA adapter weights of lora: {cfg.lora} are missing, "
                              f"e.g. {missing[0]}")  # fmt: skip
    trainable = Trainable(named)  # the trainer's naming of the same tensors: EMA keys match by construction
    with torch.no_grad():
        if weights == "raw":
            for key, p in trainable.named_tensors().items():
                p.copy_(tensors[key])
        else:
            del tensors
            ema = EMA(trainable)
            try:
                ema.load_state_dict(ckpt.read_state(step / "ema"))
            except ValueError as e:
                raise CheckpointError(f"{step / 'ema.safetensors'}: not the EMA of {file}'s tensors ({e})") from None
            ema.copy_to(trainable)
            say(f"EMA after {ema.num_updates} updates")
    skipped = sum(len(groups[c]) for c in IGNORED if c in groups)
    loaded = sum(len(groups[c]) for c in trained)
    say(f"loaded {loaded} trained tensors ({', '.join(trained)}) from {file.name}"
        f"{' (EMA shadows from ema.safetensors)' if weights == 'ema' else ''}"
        f"{f'; skipped {skipped} of {IGNORED}' if skipped else ''}")  # fmt: skip
    return trained
