#!/usr/bin/env bash
# docs/results.md's real-data runs and their evaluation, on one GPU, in the background so they outlive one device
# call (each call of the device tool is at most 10 minutes):
#   call 1:  setsid nohup bash bench/cifar_gpu.sh > /tmp/cifar-run.log 2>&1 < /dev/null & bash bench/gpu_wait.sh 540
#   later:   bash bench/gpu_wait.sh 560     (prints progress; packs /tmp/cifar into $OUT once it is done)
# Issue each later call at once: the machine goes back 30 s after a call ends, and the run with it (gpu_wait.sh
# then says so at once). The default needs ~20 min of one machine (three calls).
# Stages: (1) the CIFAR-10 classifier beside the CIFAR-10 VAE; (2) the CIFAR-10 U-Net + text tower (10 min: 96.1%
# prompted-class accuracy at cfg 3 in docs/results.md); (3) four lanes at once: ldm eval --suite cifar10 at cfg 2-6
# with 10,000 samples, and sample grids | ldm analyze (and the Gaussian), then the teleported samplers | the same
# sampler given only the steps teleportation leaves | the OpenMoji fine-tune and its from-scratch baseline.
# Data: .data/{cifar10,openmoji} (copies of ../shared/data). SMOKE=1: a CPU plumbing run of minutes.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
D=${DATA:-.data}; R=${RESULTS:-/tmp/cifar}; rm -rf "$R"; mkdir -p "$R"
# the GPU settings; each plan below changes what differs (SMOKE: all of them)
MARGIN=40 N=1000 NT=1000 NC=1000 BS=1000 DEV=cuda CLF="--epochs 24 --batch-size 512"
SMALL=(cifar10:batch_size=512 cifar10:optim.lr=5e-4 cifar10:lr_schedule.warmup_steps=200) OMSET=() VSET=()
CFGS="3 2 4 6"; PNGS=5000; GRID=10; AN="--n 10 --steps 25"; STEPS=25
if [ "${SMOKE:-0}" = 1 ]; then
  export LDM_CAL_STEPS=3 CUDA_VISIBLE_DEVICES=
  VAE_S=40 UNET_S=40 OM_S=60 MARGIN=5 N=2 NT=1 NC=2 BS=20 DEV=cpu CLF="--epochs 1 --limit 512 --batch-size 64 --width 8"
  SMALL=(cifar10:batch_size=4 cifar10:data.max_samples=64 cifar10:data.num_workers=0 cifar10:validation.every=0)
  OMSET=(openmoji-finetune:batch_size=4 openmoji-scratch:batch_size=4 openmoji-finetune:data.max_samples=32
         openmoji-scratch:data.max_samples=32 openmoji-finetune:data.num_workers=0 openmoji-scratch:data.num_workers=0
         openmoji-finetune:validation.every=0 openmoji-scratch:validation.every=0)
  VSET=("${SMALL[@]}"); CFGS="1.5 3"; FRACS="0.24"; PNGS=300; GRID=2; AN="--n 2 --steps 4"; STEPS=5
elif [ "${SHORT:-0}" = 1 ]; then  # what fitted the device time left after the shuffling fix (docs/results.md)
  VAE_S=150 UNET_S=380 OM_S=240 NT=200 NC=200 FRACS="0.24"
elif [ "${MID:-0}" = 1 ]; then  # two back-to-back device calls (~17 min): no OpenMoji, 20,000 samples at cfg 3
  VAE_S=130 UNET_S=${UNET_S:-560} OM_S=0 N=2000 FRACS="0.16 0.32"
else  # one machine, ~20 min
  VAE_S=${VAE_S:-130} UNET_S=${UNET_S:-600} OM_S=${OM_S:-300} FRACS="0.12 0.24 0.36"
fi
stage() { echo "$(date +%T) $*" | tee -a "$R/stages.txt"; }
source bench/shapes_common.sh  # ev: ldm eval without the installed console script
an() {  # the same for ldm analyze
  python3 -c "import argparse, sys; from inference import analyze_cli; p = argparse.ArgumentParser(); s = p.add_subparsers(); analyze_cli.register(s); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))" analyze "$@"
}
C=runs/cifar10-classifier; M=runs/cifar10/model-ema
E=(--suite cifar10 --model $M --classifier $C --data $D/cifar10 --steps $STEPS --batch-size $BS --device $DEV --dtype bf16 -q)
[ $DEV = cpu ] && E=(--suite cifar10 --model $M --classifier $C --data $D/cifar10 --steps $STEPS --batch-size $BS --device cpu -q)

[ $DEV = cuda ] && [ "${SHORT:-0}${MID:-0}" = 00 ] && python3 bench/sdpa_grad_check.py > $R/sdpa_grad_check.txt 2>&1
stage "1. classifier beside the CIFAR-10 VAE"
python3 -m training.classifier --data $D/cifar10 --out $C $CLF > $R/classifier.txt 2>&1 &
python3 bench/train_gpu.py --stage vae --jobs cifar10 --data $D --budget-s $VAE_S --margin-s $MARGIN --out $R/vae \
  --set cifar10:mixed_precision=bf16 "${VSET[@]}" > $R/vae.txt 2>&1 || { stage "VAE failed"; touch $R/done; exit 1; }
wait
cp $C/metrics.json $R/classifier-metrics.json
stage "2. CIFAR-10 U-Net + text tower"
python3 bench/train_gpu.py --stage unet --jobs cifar10 --data $D --budget-s $UNET_S --margin-s $MARGIN --vae-from runs --out $R/unet \
  --set cifar10:mixed_precision=bf16 "${SMALL[@]}" > $R/unet.txt 2>&1 || { stage "U-Net failed"; touch $R/done; exit 1; }

stage "3. evaluation in three lanes, the OpenMoji fine-tune + scratch in a fourth"
[ "$OM_S" != 0 ] && python3 bench/train_gpu.py --stage unet --jobs openmoji-finetune openmoji-scratch --data $D --budget-s $OM_S --margin-s $MARGIN \
  --vae-from runs --out $R/openmoji --set "${OMSET[@]}" > $R/openmoji.txt 2>&1 &
python3 bench/cifar_pngs.py --data $D/cifar10 --n $PNGS --out /tmp/cifar-png > /dev/null
(  # lane A: the guidance sweep, then the grid
for cfg in $CFGS; do
  extra=(); n=$NC; [ $cfg = 3 ] && extra=(--baselines --vae-psnr) && n=$N
  ev "${E[@]}" --n $n --cfg-scale $cfg "${extra[@]}" --out $R/eval-cfg$cfg > $R/eval-cfg$cfg.txt 2>&1
  stage "eval cfg $cfg: exit $?"
done
python3 bench/sample_grid.py --model $M --prompts cifar10 --seeds $GRID --steps $STEPS --cfg-scale 3 --device $DEV --out $R/grid-cifar10-cfg3.png
) &
(  # lane B: ldm analyze (its Gaussian is what teleportation starts from), then the teleported samplers
an --model $M --prompts bench/cifar10_prompts.txt $AN --cfg-scale 3 --data /tmp/cifar-png --data-n $PNGS \
  --teleport-n 0 --device $DEV --out $R/analyze > $R/analyze.txt 2>&1; stage "analyze: exit $?"
for f in $FRACS; do
  ev "${E[@]}" --n $NT --cfg-scale 3 --teleport $f --teleport-stats $R/analyze/gaussian.safetensors --out $R/tp-$f > $R/tp-$f.txt 2>&1
  stage "teleport $f: exit $?"
done
) &
(  # lane C: the full sampler and the same sampler given only the steps that teleportation leaves
ev "${E[@]}" --n $NT --cfg-scale 3 --out $R/tp-full > $R/tp-full.txt 2>&1
for f in $FRACS; do
  k=$(python3 -c "print(round($f * $STEPS))")
  ev "${E[@]}" --n $NT --cfg-scale 3 --steps $((STEPS - k)) --out $R/steps-$((STEPS - k)) > $R/steps-$((STEPS - k)).txt 2>&1
  stage "steps $((STEPS - k)) (teleport $f's count): exit $?"
done
) &
wait
stage "lanes done"
for job in $([ "$OM_S" != 0 ] && echo openmoji-finetune openmoji-scratch); do
  python3 bench/sample_grid.py --model runs/$job/model-ema --prompts "spider web" "cat face" "rocket" "grinning face" \
    "red heart" "sun" "pizza" "house" --seeds $GRID --steps $STEPS --cfg-scale 3 --resolution 64 --device $DEV \
    --out $R/grid-$job.png
done
python3 bench/sample_grid.py --model $M --prompts "spider web" "cat face" "rocket" "grinning face" "red heart" \
  "sun" "pizza" "house" --seeds $GRID --steps $STEPS --cfg-scale 3 --resolution 64 --device $DEV --out $R/grid-openmoji-before.png
find $R -name "*.json" -size +3M -exec gzip {} \;
stage "all done"
touch $R/done
