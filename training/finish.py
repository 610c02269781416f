"""What a run shows and leaves behind: validation grids, the fitted VAE latent scale, the final models.

    validate       task=unet: the validation prompts sampled to a grid; task=vae: reconstructions and PSNR
    fit_vae_scale  task=vae: scale_factor = 1 / std of the latents, for the raw and the EMA weights
    save_final     model/ and model-ema/ (ldm bundles), or with LoRA lora[-ema].safetensors and the merged model/
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from ldm.bundle import save_bundle
from ldm.checkpoint import write_safetensors
from ldm.lora import lora_state_dict, merge_lora

from . import checkpointing as ckpt
from .distributed import full_view
from .vae_task import fit_scale_factor, reconstruct_grid
from .validation import sample_validation, save_grid

__all__ = ["fit_vae_scale", "lora_metadata", "save_final", "validate"]

logger = logging.getLogger("ldm.train")


def lora_metadata(lora_cfg) -> dict[str, str]:
    """The string metadata of a LoRA adapter file: rank, alpha, target modules."""
    return {"rank": str(lora_cfg.rank), "alpha": str(lora_cfg.alpha), "target_modules": ",".join(lora_cfg.target_modules)}


def validate(cfg, bundle, trainable, ema, step, out, metrics, main, device, recon_images=None) -> None:
    """task=unet: the validation prompts sampled to a grid; task=vae: ``recon_images`` over their reconstructions
    (posterior mean), and the reconstruction PSNR. With the EMA weights when EMA is on (validation.use_ema).
    Every process calls it; under FSDP they all gather the weights first, then the main process alone samples."""
    bundle, trainable, ema = full_view(bundle, trainable, ema, main, device)  # collective under FSDP
    if not main or (cfg.task == "vae" and recon_images is None):
        return
    use_ema = ema is not None and cfg.validation.use_ema
    if use_ema:
        ema.store(trainable)
        ema.copy_to(trainable)
    modules = (bundle.unet, bundle.text, bundle.vae)
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        if recon_images is not None:
            images, value = reconstruct_grid(bundle.vae, recon_images, device, torch.float32)
            ncols = len(recon_images)
            metrics.log(step, {"vae/psnr": value})
            logger.info("step %d: reconstruction PSNR %.2f dB", step, value)
        else:
            size = cfg.validation.size(cfg.data.size)
            images = sample_validation(bundle, cfg.validation, size, device=device, dtype=torch.float32)
            k = cfg.validation.images_per_prompt
            ncols = k if k > 1 else len(images)
    finally:
        for m, was in zip(modules, was_training):
            m.train(was)
        if use_ema:
            ema.restore(trainable)
    path = save_grid(images, out / "validation" / f"{ckpt.step_dir_name(step)}.png", ncols)
    metrics.image("validation", images, step)
    logger.info("validation images: %s", path)


def fit_vae_scale(cfg, bundle, trainable, ema, rows, device) -> None:
    """task=vae: write 1 / std of the (EMA, when on) autoencoder's latents into the model config; the raw and EMA
    models get the scale of their own weights."""
    scales = {}
    was = bundle.vae.training
    bundle.vae.eval()
    for which in ("raw", "ema") if ema is not None else ("raw",):
        if which == "ema":
            ema.store(trainable)
            ema.copy_to(trainable)
        try:
            scales[which] = fit_scale_factor(bundle.vae, rows, cfg.batch_size, device, torch.float32)
        finally:
            if which == "ema":
                ema.restore(trainable)
    bundle.vae.train(was)
    bundle.config = dataclasses.replace(bundle.config, vae=dataclasses.replace(bundle.config.vae, scale_factor=scales["raw"]))
    bundle.fitted_scales = scales  # save_final puts the EMA one into model-ema
    logger.info("latent scale_factor = 1 / std(z): %s", ", ".join(f"{k} {v:.5f}" for k, v in scales.items()))


def save_final(cfg, bundle, trainable, ema, out: Path) -> None:
    """model/ (ldm bundle), model-ema/ (bundle with the EMA weights), or with LoRA lora[-ema].safetensors and
    model/ with the adapters merged."""
    if cfg.lora is not None:
        meta = lora_metadata(cfg.lora)
        write_safetensors(lora_state_dict(bundle.unet), out / "lora.safetensors", metadata=meta)
        if ema is not None:
            ema.store(trainable)
            ema.copy_to(trainable)
            write_safetensors(lora_state_dict(bundle.unet), out / "lora-ema.safetensors", metadata=meta)
            ema.restore(trainable)
        merge_lora(bundle.unet)
        save_bundle(bundle, out / "model")
    else:
        save_bundle(bundle, out / "model")
        if ema is not None:
            ema.store(trainable)
            ema.copy_to(trainable)
            raw_config = bundle.config
            if "ema" in getattr(bundle, "fitted_scales", {}):  # task=vae: the EMA autoencoder's own latent scale
                vae = dataclasses.replace(raw_config.vae, scale_factor=bundle.fitted_scales["ema"])
                bundle.config = dataclasses.replace(raw_config, vae=vae)
            try:
                save_bundle(bundle, out / "model-ema")
            finally:
                bundle.config = raw_config
                ema.restore(trainable)
    logger.info("saved %s", out / "model")
