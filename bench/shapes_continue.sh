#!/usr/bin/env bash
# Continue training the embedded default from an earlier result (one device call < 10 min): the U-Net and text
# tower of .carry/shapes-vae/model-ema (an fp16 model from bench/shapes_gpu.sh, its VAE stays frozen) train on, sized
# to the budget; then the fp16 export and `ldm eval`, as bench/shapes_gpu.sh.
#   bash bench/shapes_continue.sh [UNET_BUDGET_S] [KEY=VALUE ...]
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
R=/tmp/shapes; rm -rf $R; mkdir -p $R
budget=${1:-480}; shift || true
sets=(shapes:model.source=.carry/shapes-vae/model-ema); for kv in "$@"; do sets+=("shapes:$kv"); done
source "$(dirname "$0")/shapes_common.sh"
python3 bench/train_gpu.py --stage unet --jobs shapes --data .data --budget-s $budget --margin-s 45 --vae-from .carry --out $R/unet --set "${sets[@]}" > $R/unet.txt 2>&1
export_eval_pack $R
