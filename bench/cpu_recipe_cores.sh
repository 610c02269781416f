#!/usr/bin/env bash
# `ldm train` with no arguments (training/recipe.py: the embedded default's two stages at CPU scale) on N cores of
# this host's CPU, the GPU hidden, then `ldm eval` of its raw weights on the same cores. Several core counts run side
# by side on disjoint cores, each in its own working folder (the recipe writes runs/default under the current one):
#   bash bench/cpu_recipe_cores.sh 8:0-7 4:8-11      # NAME:CPULIST ...; after the wheel install prefix on the device
#   EXTRA="max_steps=5" EVAL_N=4 bash bench/cpu_recipe_cores.sh 2:0-1     # a smoke run (overrides for both stages)
# Writes $OUT/times.txt (seconds of `ldm train` and of the evaluation per core count), $OUT/train-NAME.log and
# $OUT/eval-NAME.txt (the adherence table: 200 + 200 held-out prompts, cfg 5, as docs/default_model.md measures it).
set -u
source bench/shapes_common.sh
OUT=${OUT:-out}; mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ROOT=$PWD
EXTRA=${EXTRA:-}
EVAL_N=${EVAL_N:-200}
[ $# -ge 1 ] || { echo "usage: bash bench/cpu_recipe_cores.sh NAME:CPULIST ...  (e.g. 8:0-7 4:8-11)" >&2; exit 2; }
for spec in "$@"; do
  case $spec in *:*) ;; *) echo "bench/cpu_recipe_cores.sh: '$spec' is not NAME:CPULIST (e.g. 8:0-7)" >&2; exit 2;; esac
done
for spec in "$@"; do
  name=${spec%%:*}; cpus=${spec#*:}
  (
    taskset -cp "$cpus" $BASHPID > /dev/null || exit 1  # this subshell and all it starts run on these cores
    threads=$(nproc)  # the cores this subshell may use
    d=/tmp/cpu_recipe_cores/$name; rm -rf "$d"; mkdir -p "$d"; cd "$d"
    export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=$threads PYTHONPATH=$ROOT:${PYTHONPATH:-}
    SECONDS=0
    if [ -z "$EXTRA" ]; then  # exactly `ldm train`
      python3 -m training.train > "$OUT/train-$name.log" 2>&1
    else  # the recipe with overrides for both stages (the CLI reads a first KEY=VALUE as a CONFIG)
      # shellcheck disable=SC2086  # EXTRA is a list of KEY=VALUE words
      python3 -c "import logging, sys; logging.basicConfig(level=logging.INFO); from training.recipe import run_default; run_default(extra=sys.argv[1:])" $EXTRA > "$OUT/train-$name.log" 2>&1
    fi || { echo "$name: ldm train failed" >> "$OUT/times.txt"; exit 1; }
    train_s=$SECONDS; SECONDS=0
    ev --model runs/default/model/model --prompts both --n "$EVAL_N" --steps 25 --sampler dpmpp_2m --cfg-scale 5 \
       --device cpu --out "$d/eval" -q > "$OUT/eval-$name.txt" 2>&1
    for g in "$d"/eval/grid-*.png; do [ -f "$g" ] && cp "$g" "$OUT/eval-$name-$(basename "$g")"; done
    echo "$name: $threads cores ($cpus): ldm train ${train_s} s, ldm eval (n=$EVAL_N) ${SECONDS} s" >> "$OUT/times.txt"
  ) &
done
wait
cat "$OUT/times.txt"
