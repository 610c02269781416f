"""`ldm train` with no arguments (training/recipe.py): its two stages are the committed model's architecture, made
smaller where the recipe says so and nowhere else."""
import dataclasses
from pathlib import Path

import yaml

import inference.default_model as default_model
from ldm.model_config import load_model_config
from training.config import load_train_config
from training.recipe import CONFIGS, CPU_MODEL, stage_configs


def test_the_cpu_recipe_trains_the_committed_architecture(tmp_path):
    out = tmp_path / "default"
    (out / "vae" / "model-ema").mkdir(parents=True)  # stage 2's model.vae must exist when its config is read
    vae_cfg, unet_overrides = stage_configs(str(out))
    unet_cfg = load_train_config(CONFIGS / "shapes.yaml", unet_overrides)
    with open(CONFIGS / "shapes.yaml") as f:
        written = yaml.safe_load(f)["model"]["overrides"]
    assert unet_cfg.model.overrides == written + CPU_MODEL  # the YAML's architecture, once, then the CPU changes
    assert unet_cfg.model.vae == f"{out}/vae/model-ema" and unet_cfg.output_dir == f"{out}/model"
    assert vae_cfg.output_dir == f"{out}/vae" and vae_cfg.task == "vae"
    assert (unet_cfg.batch_size, unet_cfg.max_steps, unet_cfg.ema.decay) == (128, 1200, 0.99)
    assert (unet_cfg.optim.lr, unet_cfg.loss.weighting, unet_cfg.loss.min_snr_gamma) == (2e-3, "min_snr", 5.0)

    recipe = unet_cfg.model.model_config()
    committed = load_model_config(Path(default_model.__file__).parent / "config.yaml")
    small = {"model_channels": 32, "channel_mult": (1, 2), "transformer_depth": (1, 1), "num_res_blocks": 1,
             "num_head_channels": 16}
    assert {k: getattr(recipe.unet, k) for k in small} == small
    assert dataclasses.replace(recipe.unet, **{k: getattr(committed.unet, k) for k in small}) == committed.unet
    assert recipe.diffusion == committed.diffusion
    text, text_committed = recipe.text[0], committed.text[0]
    assert (text.context_length, text.layers) == (16, 2)
    assert (text_committed.context_length, text_committed.layers) == (77, 4)
    assert dataclasses.replace(text, context_length=77, layers=4) == text_committed
    # the VAE differs only in the latent scale that stage 1 fits (the committed one is fitted to its own VAE)
    assert dataclasses.replace(recipe.vae, scale_factor=committed.vae.scale_factor) == committed.vae
