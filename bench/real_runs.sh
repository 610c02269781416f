#!/usr/bin/env bash
# The GPU runs of docs/real_data.md and of the embedded default, in two device calls of < 10 minutes on one H200
# (the second must follow the first while the machine is warm: it reads the first one's VAEs from runs/).
#   bench/real_runs.sh 1    cifar10 + openmoji VAEs (~9 min); shapes VAE (~2 min), then a pilot shapes U-Net
#   bench/real_runs.sh 2    cifar10 + openmoji U-Nets on those VAEs (~9 min); the shapes U-Net again, longer
# Data: .data/{cifar10/train.parquet,openmoji} (copies of ../shared/data). Results: $OUT/results.tar.gz.part-*
set -u
phase=$1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
R=/tmp/res$phase; rm -rf $R; mkdir -p $R
ev() {  # ldm eval without the installed console script
  python3 -c "import argparse, sys; from inference import eval_cli; p = argparse.ArgumentParser(); s = p.add_subparsers(); eval_cli.register(s); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))" eval "$@"
}
shapes_eval() {  # $1 model, $2 out
  for cfg in 2 4; do
    ev --model $1 --prompts both --n 200 --steps 25 --sampler dpmpp_2m --cfg-scale $cfg --batch-size 200 \
       --device cuda --out $2/eval-cfg$cfg -q > $2/eval-cfg$cfg.txt 2>&1
  done
}
if [ "$phase" = 1 ]; then
  python3 bench/train_gpu.py --stage vae --jobs cifar10 openmoji --data .data --budget-s 525 --out $R/vae > $R/vae.txt 2>&1 &
  python3 bench/train_gpu.py --stage vae --jobs shapes --data .data --budget-s 170 --margin-s 45 --out $R/svae > $R/svae.txt 2>&1
  python3 bench/train_gpu.py --stage unet --jobs shapes --data .data --budget-s 290 --margin-s 60 --vae-from runs --out $R/sunet > $R/sunet.txt 2>&1
  shapes_eval runs/shapes/model-ema $R/sunet
  cp -r runs/shapes/model-ema $R/shapes-model-ema
  wait
else
  jobs=${JOBS:-cifar10 openmoji}
  for i in $(seq 60); do test -f runs/openmoji-vae/model-ema/model.safetensors && break; sleep 5; done  # phase 1's last VAE
  for v in $jobs; do test -f runs/$v-vae/model-ema/model.safetensors || { echo "no runs/$v-vae: the machine was released"; exit 3; }; done
  (cd /tmp && tar czf res1.tgz --exclude=shapes-model-ema res1 && cp res1.tgz $OUT/phase1.tgz)
  python3 bench/train_gpu.py --stage unet --jobs $jobs --data .data --budget-s ${BUDGET:-480} --vae-from runs --out $R/unet > $R/unet.txt 2>&1
fi
cat $R/*.txt | tail -40
cd /tmp && tar czf res.tgz $(basename $R) && split -b 15M -d res.tgz $OUT/results.tgz.part-
ls -la $OUT
