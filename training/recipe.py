"""``ldm train`` with no arguments: the embedded default's two stages at CPU scale, in 7-8.5 minutes on 2 cores.

    stage 1  configs/train/shapes-vae.yaml   the KL-f4 autoencoder of the builtin shapes         -> OUT/vae/
    stage 2  configs/train/shapes.yaml       U-Net + text tower on that VAE (its model-ema)       -> OUT/model/

The committed model's configurations (docs/default_model.md) with fewer rows, other batch sizes and fewer steps
(CPU_OVERRIDES), and for stage 2 a smaller U-Net and text tower with a 16-token context (CPU_MODEL). Measured on 2
CPU cores, 2026-11-27: 8 min 28 s in all (6 min 48 s in a later run on the same kind of machine, the same results to
the last digit); the VAE (500 steps of 8) reaches 27.9 dB validation PSNR; the U-Net (1,200 steps of 128, 153,600
images, min-SNR-5 loss weighting, lr 2e-3) gets colour and shape right for 76.5% of 200 held-out single-object
prompts (67.0% with seed=1; size 82%, but position only 43%), and two-object prompts with a relation fully right
for 8%. The previous recipe (2,400 steps at lr 1e-3, simple loss: 13 min 53 s) scored 80.0% / 10% with position
74%. The committed model (the larger architecture, ~3.3M samples on an H200) does both: 99.5% single, 97.5%
relation.
The result loads like any model:

    ldm txt2img --model runs/default/model/model "a red circle" --cfg 5
    ldm eval --model runs/default/model/model --n 50
"""
from __future__ import annotations

import logging
from pathlib import Path

import configs

from .config import load_train_config

logger = logging.getLogger("ldm.train")

CONFIGS = Path(configs.__file__).resolve().parent / "train"
OUT = "runs/default"
# per stage: the YAML and its CPU-scale overrides
CPU_OVERRIDES = {
    # L2, not the original's L1: at this budget L1 learns the background (the median) and leaves the small objects
    # grey (validation PSNR 18.3 dB); L2 weights the large colour errors and reaches 27.1 dB with the same images
    # (bench/cpu_recipe_sim.sh, docs/default_model.md)
    "shapes-vae.yaml": ["shapes.rows=2000", "batch_size=8", "max_steps=500", "lr_schedule.warmup_steps=20",
                        "optim.lr=2e-3", "vae_loss.recon=l2", "data.num_workers=0", "checkpoint_every=250",
                        "validation.every=250", "log_every=20"],  # fmt: skip
    # ema.decay 0.99: an average over the last ~100 steps (0.999 lags the weights at this length).
    # batch 128: 2 cores train the committed U-Net at ~160-185 img/s at batch 128-256 against 84-100 at batch 32
    # min-SNR-5 weighting and lr 2e-3: half the steps of the previous recipe (2,400 at 1e-3, simple loss) for the
    # same single-object colour and shape (docs/default_model.md, "Half the steps: min-SNR")
    "shapes.yaml": ["shapes.rows=4000", "batch_size=128", "max_steps=1200", "lr_schedule.warmup_steps=50",
                    "optim.lr=2e-3", "loss.weighting=min_snr", "data.num_workers=0", "checkpoint_every=600",
                    "validation.every=600", "log_every=20", "validation.images_per_prompt=2", "ema.decay=0.99"],  # fmt: skip
}
# Stage 2's model changes, appended to the YAML's model.overrides: a smaller U-Net and text tower (3.5M trainable
# parameters against 8.3M: 32 channels, two levels, one res block per level, 2 text layers), which 2 cores train at
# ~420 img/s against ~170, and a 16-token text context (the captions have at most 12 tokens; 20% faster than 77). In
# ~12 minutes 307,200 images at the simple loss got colour and shape right for 80% of held-out single-object prompts;
# the committed architecture's 102,400 images in ~10 minutes for 24% (docs/default_model.md).
CPU_MODEL = ["unet.model_channels=32", "unet.channel_mult=[1,2]", "unet.transformer_depth=[1,1]",
             "unet.num_res_blocks=1", "unet.num_head_channels=16", "text[0].layers=2", "text[0].context_length=16"]


def _model_overrides(yaml_name: str, extra: list[str]) -> str:
    """``model.overrides=[...]``: the YAML's list with ``extra`` appended (the architecture is written once)."""
    import json

    import yaml

    with open(CONFIGS / yaml_name) as f:
        base = yaml.safe_load(f)["model"]["overrides"]
    return "model.overrides=" + json.dumps(list(base) + list(extra))


def stage_configs(out: str = OUT, extra: list[str] = ()):
    """The two TrainConfigs of the recipe (stage 2's ``model.vae`` is stage 1's EMA model)."""
    vae = load_train_config(CONFIGS / "shapes-vae.yaml", CPU_OVERRIDES["shapes-vae.yaml"] + [f"output_dir={out}/vae"]
                            + list(extra))  # fmt: skip
    unet_overrides = CPU_OVERRIDES["shapes.yaml"] + [_model_overrides("shapes.yaml", CPU_MODEL),
                                                     f"output_dir={out}/model", f"model.vae={out}/vae/model-ema"]
    return vae, unet_overrides


def run_default(out: str = OUT, extra: list[str] = ()) -> Path:
    """Train both stages (each resumes where an interrupted earlier call stopped); returns stage 2's model folder
    (raw weights)."""
    from .train import train

    vae_cfg, unet_overrides = stage_configs(out, extra)
    logger.info("ldm train (no CONFIG): the embedded default at CPU scale, stage 1 of 2: the VAE -> %s", vae_cfg.output_dir)
    if not (Path(vae_cfg.output_dir) / "model-ema" / "model.safetensors").is_file():
        train(vae_cfg)
    unet_cfg = load_train_config(CONFIGS / "shapes.yaml", unet_overrides + list(extra))  # model.vae exists now
    logger.info("stage 2 of 2: the U-Net and text tower -> %s", unet_cfg.output_dir)
    train(unet_cfg)
    model = Path(unet_cfg.output_dir) / "model"  # the raw weights (they score above the EMA's: 76.5% against 65.0%)
    logger.info("done: %s  (try: ldm txt2img --model %s \"a red circle\" --cfg 5)", model, model)
    return model
