#!/usr/bin/env bash
# The embedded default on one H200 in one device call (< 10 min): the shapes VAE, then the U-Net + text tower on it,
# sized by bench/train_gpu.py to the time left, then `ldm eval` on held-out prompts. Brings back the model in fp16
# ($OUT/model.tgz.part-*), the logs, validation grids and eval reports ($OUT/shapes.tgz).
#   bash bench/shapes_gpu.sh [VAE_BUDGET_S] [UNET_BUDGET_S]
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
R=/tmp/shapes; rm -rf $R; mkdir -p $R
ev() {  # ldm eval without the installed console script
  python3 -c "import argparse, sys; from inference import eval_cli; p = argparse.ArgumentParser(); s = p.add_subparsers(); eval_cli.register(s); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))" eval "$@"
}
python3 bench/train_gpu.py --stage vae --jobs shapes --data .data --budget-s ${1:-150} --margin-s 40 --out $R/vae > $R/vae.txt 2>&1
python3 bench/train_gpu.py --stage unet --jobs shapes --data .data --budget-s ${2:-330} --margin-s 50 --vae-from runs --out $R/unet > $R/unet.txt 2>&1
python3 -c "import autoencoder, text_encoder; from ldm.bundle import load_bundle, save_bundle; save_bundle(load_bundle('runs/shapes/model-ema', dtype='fp16'), '$R/model')"
for cfg in 3 5; do
  ev --model $R/model --prompts both --n 200 --steps 25 --sampler dpmpp_2m --cfg-scale $cfg --batch-size 400 --device cuda \
     --out $R/eval-cfg$cfg -q > $R/eval-cfg$cfg.txt 2>&1
done
cat $R/*.txt
cd /tmp && tar czf $OUT/shapes.tgz --exclude=shapes/model shapes && tar cf - shapes/model | split -b 15M -d - $OUT/model.tar.part-
ls -la $OUT
