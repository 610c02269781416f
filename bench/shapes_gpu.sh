#!/usr/bin/env bash
# The embedded default on one H200 in one device call (< 10 min): the shapes VAE, then the U-Net + text tower on it,
# sized by bench/train_gpu.py to the time left, then `ldm eval` on held-out prompts. Brings back the model in fp16
# ($OUT/model.tgz.part-*), the logs, validation grids and eval reports ($OUT/shapes.tgz).
#   bash bench/shapes_gpu.sh [VAE_BUDGET_S] [UNET_BUDGET_S]
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
R=/tmp/shapes; rm -rf $R; mkdir -p $R
source "$(dirname "$0")/shapes_common.sh"
python3 bench/train_gpu.py --stage vae --jobs shapes --data .data --budget-s ${1:-150} --margin-s 40 --out $R/vae > $R/vae.txt 2>&1
python3 bench/train_gpu.py --stage unet --jobs shapes --data .data --budget-s ${2:-330} --margin-s 50 --vae-from runs --out $R/unet > $R/unet.txt 2>&1
export_eval_pack $R
