#!/usr/bin/env bash
# Variants of `ldm train`'s CPU-scale recipe (training/recipe.py), run side by side on the GPU: each variant does
# exactly the steps and batch sizes the 2-core CPU run would (same seeds, same data), only faster, then is scored
# with `ldm eval` (50 + 50 held-out prompts, cfg 5). Used to choose the recipe; the chosen one is re-timed on CPU.
#   bash bench/cpu_recipe_sim.sh     (after the wheel install prefix; results under $OUT)
set -u
source bench/shapes_common.sh
OUT=${OUT:-out}; mkdir -p "$OUT"
R=/tmp/sim; mkdir -p $R
C=configs/train
VAE_BASE="shapes.rows=2000 data.num_workers=0 checkpoint_every=0 validation.every=0 log_every=20 lr_schedule.warmup_steps=20"
UNET_BASE="shapes.rows=4000 data.num_workers=0 checkpoint_every=0 validation.every=0 log_every=20 validation.prompts=[]"
vae() {  # name, overrides...
  local n=$1; shift
  python3 -m training.train $C/shapes-vae.yaml $VAE_BASE output_dir=$R/$n/vae "$@" > $R/$n.vae.log 2>&1
}
unet() {  # name, vae name, overrides...
  local n=$1 v=$2; shift 2
  python3 -m training.train $C/shapes.yaml $UNET_BASE output_dir=$R/$n/model model.vae=$R/$v/vae/model-ema "$@" > $R/$n.unet.log 2>&1
  for w in model-ema model; do
    ev --model $R/$n/model/$w --prompts both --n 50 --steps 25 --sampler dpmpp_2m --cfg-scale 5 --batch-size 100 \
       --device cuda --out $R/$n/eval-$w -q > $R/$n.eval-$w.txt 2>&1
  done
}
# VAEs (stage 1): the current recipe, L2 reconstruction, L2 with a higher lr
vae v_base batch_size=16 max_steps=250 optim.lr=1e-3 &
vae v_l2 batch_size=16 max_steps=250 optim.lr=1e-3 vae_loss.recon=l2 &
vae v_l2hi batch_size=16 max_steps=250 optim.lr=3e-3 vae_loss.recon=l2 &
vae v_l2b8 batch_size=8 max_steps=500 optim.lr=2e-3 vae_loss.recon=l2 &
wait
for v in v_base v_l2 v_l2hi v_l2b8; do grep -o '"vae/psnr": [0-9.]*' $R/$v/vae/logs/metrics.jsonl | tail -1 | sed "s/^/$v /"; done > $OUT/vae_psnr.txt
cat $OUT/vae_psnr.txt
BEST=$(sort -t: -k2 -n -r $OUT/vae_psnr.txt | head -1 | cut -d' ' -f1)
echo "best VAE: $BEST" | tee -a $OUT/vae_psnr.txt
# U-Nets (stage 2) on the current VAE and on the best one
unet u_base v_base batch_size=32 max_steps=500 lr_schedule.warmup_steps=50 &
unet u_best $BEST batch_size=32 max_steps=500 lr_schedule.warmup_steps=50 &
unet u_best_lr2 $BEST batch_size=32 max_steps=500 lr_schedule.warmup_steps=50 optim.lr=2e-3 &
unet u_best_b16 $BEST batch_size=16 max_steps=1000 lr_schedule.warmup_steps=50 &
unet u_best_small $BEST batch_size=32 max_steps=800 lr_schedule.warmup_steps=50 'model.overrides=[vae.base_channels=32, "vae.channel_mult=[1,2,2]", vae.num_res_blocks=1, vae.norm_num_groups=16, unet.model_channels=32, "unet.channel_mult=[1,2,2]", "unet.transformer_depth=[1,1,1]", unet.num_res_blocks=1, unet.num_head_channels=16, unet.norm_groups=16, unet.context_dim=48, "text[0].width=48", "text[0].layers=2", "text[0].heads=4"]' &
wait
for f in $R/*.eval-*.txt; do echo "== $f"; tail -6 $f; done > $OUT/evals.txt
cat $OUT/evals.txt
for n in u_base u_best u_best_lr2 u_best_b16 u_best_small; do
  grep -h "images_per_s" $R/$n/model/logs/metrics.jsonl | tail -1 | sed "s/^/$n /"
done > $OUT/speed.txt
(cd $R && tar czf $OUT/sim.tgz --exclude='*.safetensors' --exclude='checkpoints' .)
