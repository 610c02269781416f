#!/usr/bin/env bash
# Phase 2 as it ran (see docs/real_data.md): phase 1's openmoji VAE was cut at step 4050 by the call's time limit,
# so it resumes from its last checkpoint (resume=latest, the same settings) while the cifar10 U-Net trains; then
# the openmoji U-Net gets the rest of the call.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
R=/tmp/res2; rm -rf $R; mkdir -p $R; t0=$(date +%s)
(cd /tmp && tar czf $OUT/phase1.tgz --exclude=shapes-model-ema res1)
python3 bench/train_gpu.py --stage unet --jobs cifar10 --data .data --budget-s 480 --vae-from runs --out $R/c > $R/c.txt 2>&1 &
python3 -m training.train configs/train/openmoji-vae.yaml output_dir=runs/openmoji-vae data.source=.data/openmoji \
  max_steps=5400 checkpoint_every=1350 validation.every=1350 vae_loss.disc_start=2700 resume=latest > $R/openmoji-vae-resume.log 2>&1
mkdir -p $R/openmoji-vae && cp -r runs/openmoji-vae/logs runs/openmoji-vae/validation $R/openmoji-vae/
left=$((480 - ($(date +%s) - t0)))
python3 bench/train_gpu.py --stage unet --jobs openmoji --data .data --budget-s $left --vae-from runs --out $R/o > $R/o.txt 2>&1
wait
cat $R/*.txt
(cd /tmp && tar czf $OUT/phase2.tgz res2)
ls -la $OUT
