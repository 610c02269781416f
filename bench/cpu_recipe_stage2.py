"""One stage-2 variant of `ldm train`'s CPU recipe (training/recipe.py) on this machine's CPU, then its adherence.

    python bench/cpu_recipe_stage2.py NAME [KEY=VALUE ...] [--model-extra 'unet.x=..' ...] [--n 200] [--out DIR]

Trains stage 2 exactly as the recipe does (its overrides, then these), on the VAE of an existing `ldm train` run
(runs/default/vae/model-ema), into DIR/NAME, prints the training seconds, and scores the raw weights with
`ldm eval --prompts both --n N` (cfg 5, DPM-Solver++ 2M, 25 steps) into DIR/NAME-eval. The numbers of
docs/default_model.md ("Half the steps: min-SNR weighting") came from, e.g.:

    python bench/cpu_recipe_stage2.py minsnr5 optim.lr=2e-3 max_steps=1200 loss.weighting=min_snr
    python bench/cpu_recipe_stage2.py minsnr5-long optim.lr=1e-3 max_steps=2400 loss.weighting=min_snr
    python bench/cpu_recipe_stage2.py no-attn-8x8 --model-extra unet.num_head_channels=32 'unet.transformer_depth=[0,1]'
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from training.config import load_train_config
from training.recipe import CONFIGS, CPU_MODEL, _model_overrides, stage_configs
from training.train import train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("name")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="further overrides of stage 2")
    p.add_argument("--model-extra", nargs="*", default=[], metavar="KEY=VALUE",
                   help="model overrides appended after the recipe's CPU_MODEL")
    p.add_argument("--runs", default="runs/default",
                   help="the `ldm train` run whose VAE is used (default: %(default)s)")
    p.add_argument("--out", default="/tmp/cpu_recipe", help="where runs and evaluations go (default: %(default)s)")
    p.add_argument("--n", type=int, default=200, help="prompts per set for ldm eval (default: %(default)s)")
    a = p.parse_args()
    if a.n < 1:
        p.error(f"--n: must be >= 1, got {a.n}")
    vae = Path(a.runs) / "vae" / "model-ema"
    if not (vae / "model.safetensors").is_file():
        sys.exit(f"--runs: {vae}/model.safetensors not found; run `ldm train` (no arguments) first")
    _, ov = stage_configs(a.runs)
    ov = [o for o in ov if not o.startswith("output_dir=")]
    ov += [f"output_dir={a.out}/{a.name}", "checkpoint_every=100000", "validation.every=100000"]
    if a.model_extra:
        ov.append(_model_overrides("shapes.yaml", CPU_MODEL + a.model_extra))
    cfg = load_train_config(CONFIGS / "shapes.yaml", ov + a.overrides)
    t = time.time()
    train(cfg)
    print(f"{a.name}: stage 2 trained in {time.time() - t:.1f} s", flush=True)
    subprocess.run([sys.executable, "-m", "ldm.cli", "eval", "--model", f"{a.out}/{a.name}/model", "--prompts", "both",
                    "--n", str(a.n), "--cfg-scale", "5", "--device", "cpu", "--out", f"{a.out}/{a.name}-eval", "-q"],
                   check=True)  # fmt: skip


if __name__ == "__main__":
    main()
