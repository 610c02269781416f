#!/usr/bin/env bash
# Stage-2 variants of `ldm train`'s CPU recipe (training/recipe.py), side by side on one GPU: each does exactly the
# steps, batch size, seeds and data of a CPU run, on the CPU recipe's own VAE (copied to .carry/recipe-vae from
# runs/default/vae/model-ema), then is scored with `ldm eval` (50 + 50 held-out prompts, cfg 5, raw and EMA weights).
#   bash bench/cpu_recipe_sweep.sh     (after the wheel install prefix; results under $OUT as they finish)
# Each `run` line below is a variant: a name, the model overrides, and further overrides of configs/train/shapes.yaml.
# Measured 2026-11-27 on one H200: with the eight variants at once each trained at only 2.2 steps/s (a CPU-bound
# launch rate; the 2-core CPU does 1.3), so 800 steps did not fit a 330 s call. Threads are now capped per process
# (OMP_NUM_THREADS=2); the rate with the cap was not measured. Run fewer variants per call, or give it a whole call.
# SMOKE on the CPU: OUT=/tmp/s DEV=cpu EXTRA="max_steps=2 shapes.rows=256 batch_size=8" LONG=2 EVN=1 bash bench/cpu_recipe_sweep.sh
set -u
source bench/shapes_common.sh
OUT=${OUT:-out}; mkdir -p "$OUT"; R=/tmp/sweep; mkdir -p $R
DEV=${DEV:-cuda}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# model.overrides: configs/train/shapes.yaml's architecture (the committed one) plus a variant's changes
mo() { python3 -c "import sys; from training.recipe import _model_overrides; print(_model_overrides('shapes.yaml', sys.argv[1:]))" "$@"; }
ARCH=('text[0].context_length=16')  # the committed architecture with the recipe's 16-token context
SMALL=(unet.model_channels=32 unet.num_res_blocks=1 unet.num_head_channels=16 'text[0].layers=2' 'text[0].context_length=16')
BASE="shapes.rows=4000 batch_size=128 max_steps=800 lr_schedule.warmup_steps=50 data.num_workers=0 checkpoint_every=0 validation.every=0 log_every=50 validation.prompts=[] model.vae=.carry/recipe-vae ${EXTRA:-}"
run() {  # name, model.overrides=[...], further overrides...
  local n=$1 ov=$2; shift 2
  local s=$(date +%s)
  python3 -m training.train configs/train/shapes.yaml $BASE output_dir=$R/$n "$ov" "$@" > $R/$n.log 2>&1 \
    || { echo "$n: training failed" >> $OUT/summary.txt; tail -5 $R/$n.log >> $OUT/summary.txt; return; }
  for w in model-ema model; do
    ev --model $R/$n/$w --prompts both --n ${EVN:-50} --steps 25 --sampler dpmpp_2m --cfg-scale 5 --batch-size 100 --device $DEV \
       --out $R/$n-eval-$w -q > $R/$n-eval-$w.txt 2>&1
    { echo "== $n $w ($(( $(date +%s) - s )) s; $*)"; sed -n 2,5p $R/$n-eval-$w.txt; } >> $OUT/summary.txt
    cp $R/$n-eval-$w/grid-single.png $OUT/$n-$w-single.png 2>/dev/null
  done
}
V=diffusion.prediction=v
run eps "$(mo "${ARCH[@]}")" &
run v "$(mo "${ARCH[@]}" $V)" &
run v_lr2 "$(mo "${ARCH[@]}" $V)" optim.lr=2e-3 &
run v_rows20k "$(mo "${ARCH[@]}" $V)" shapes.rows=20000 &
run v_small "$(mo "${SMALL[@]}" $V)" &
run v_minsnr "$(mo "${ARCH[@]}" $V)" loss.weighting=min_snr &
run v_zsnr "$(mo "${ARCH[@]}" $V diffusion.schedule.zero_terminal_snr=true)" &
run v_2x "$(mo "${ARCH[@]}" $V)" max_steps=${LONG:-1600} &
wait
cat $OUT/summary.txt
