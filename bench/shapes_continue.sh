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
ev() {
  python3 -c "import argparse, sys; from inference import eval_cli; p = argparse.ArgumentParser(); s = p.add_subparsers(); eval_cli.register(s); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))" eval "$@"
}
python3 bench/train_gpu.py --stage unet --jobs shapes --data .data --budget-s $budget --margin-s 45 --vae-from .carry --out $R/unet --set "${sets[@]}" > $R/unet.txt 2>&1
python3 -c "import autoencoder, text_encoder; from ldm.bundle import load_bundle, save_bundle; save_bundle(load_bundle('runs/shapes/model-ema', dtype='fp16'), '$R/model')"
for cfg in 3 5; do
  ev --model $R/model --prompts both --n 200 --steps 25 --sampler dpmpp_2m --cfg-scale $cfg --batch-size 400 --device cuda \
     --out $R/eval-cfg$cfg -q > $R/eval-cfg$cfg.txt 2>&1
done
cat $R/*.txt
cd /tmp && tar czf $OUT/shapes.tgz --exclude=shapes/model shapes && tar cf - shapes/model | split -b 15M -d - $OUT/model.tar.part-
ls -la $OUT
