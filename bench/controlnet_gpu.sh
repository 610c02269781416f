#!/usr/bin/env bash
# The ControlNet obedience run (issue: condition types) in one device command:
#   bash bench/controlnet_gpu.sh            (after the wheel install prefix; writes under $OUT)
# 1. trains configs/train/shapes-controlnet.yaml (a mask ControlNet on the frozen embedded default model),
#    cut at TRAIN_S seconds if it runs long (then the latest checkpoint is exported with its EMA weights);
# 2. bench/control_obedience.py on 200 held-out single-object scenes: IoU of the objects with the map, with the
#    control, with it off, and the chance layouts.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
TRAIN_S=${TRAIN_S:-300}
STEPS=${STEPS:-1500}
RUN=runs/shapes-controlnet
timeout "$TRAIN_S" python3 -m training.train configs/train/shapes-controlnet.yaml max_steps="$STEPS" \
  checkpoint_every=250 shapes.rows=20000 output_dir=$RUN > "$OUT/train.log" 2>&1
echo "train exit $?" >> "$OUT/train.log"
MODEL=$RUN/model-ema
if [ ! -f "$MODEL/model.safetensors" ]; then
  CK=$(ls -d $RUN/checkpoints/step-* 2>/dev/null | sort | tail -1)
  echo "exporting $CK" >> "$OUT/train.log"
  python3 -c "import sys; from training.export import export_checkpoint; export_checkpoint(sys.argv[1], sys.argv[2], weights=\"ema\")" "$CK" "$RUN/exported-ema" >> "$OUT/train.log" 2>&1
  MODEL=$RUN/exported-ema
fi
cp $RUN/logs/metrics.jsonl "$OUT/" 2>/dev/null
python3 bench/control_obedience.py --model "$MODEL" --n 200 --batch 200 --out "$OUT" > "$OUT/obedience.log" 2>&1
echo "obedience exit $?" >> "$OUT/obedience.log"
python3 bench/control_obedience.py --model "$MODEL" --n 200 --batch 200 --kind relation --out "$OUT/relation" > "$OUT/obedience_relation.log" 2>&1
tail -3 "$OUT/train.log"; cat "$OUT/obedience.log" | tail -30
