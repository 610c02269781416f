#!/usr/bin/env bash
# Wait for a background run of bench/cifar_gpu.sh (at most $1 seconds), print its progress, and copy its results
# (/tmp/cifar as a tar.gz in 15 MB parts) to $OUT: whatever is there now, the whole once it is done.
T=${1:-560}; R=${RESULTS:-/tmp/cifar}; t0=$(date +%s)
[ -d $R ] || { echo "no run in $R: this is a fresh machine (the last one went back)"; exit 3; }
while [ ! -f $R/done ] && [ $(( $(date +%s) - t0 )) -lt $T ]; do sleep 10; done
cat $R/sdpa_grad_check.txt $R/stages.txt 2>/dev/null
for f in $(ls $R/*.txt | grep -v sdpa_grad); do echo "== $f"; tail -n 4 $f; done 2>/dev/null | grep -v "^$" | tail -60
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
(cd $(dirname $R) && tar czf /tmp/pack.tgz $(basename $R)) && split -b 15M -d /tmp/pack.tgz ${OUT:-/tmp}/results.tgz.part-
[ -f $R/done ] && echo DONE || echo RUNNING
