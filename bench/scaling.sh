#!/usr/bin/env bash
# Multi-GPU scaling and loss-curve check of the trainer (bench/scaling.py) in one device command, on a machine of
# 2 (or 4) GPUs. Results: $OUT/scaling.json, $OUT/scaling.md (the table for BENCHMARKS.md), $OUT/logs.tgz.
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD;
#   bash bench/scaling.sh [BUDGET_S] [extra bench/scaling.py arguments]
# BUDGET_S (default 450) is the script's own wall clock; what does not fit is skipped and recorded as such.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 bench/scaling.py --out "${OUT:-/tmp/scaling-out}" --budget-s "${1:-450}" "${@:2}"
