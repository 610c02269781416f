# Sourced by bench/shapes_gpu.sh and bench/shapes_continue.sh: `ldm eval` without the installed console script,
# and the end of a shapes run (fp16 export of runs/shapes/model-ema, eval at cfg 3 and 5, packing into $OUT).
ev() {
  python3 -c "import argparse, sys; from inference import eval_cli; p = argparse.ArgumentParser(); s = p.add_subparsers(); eval_cli.register(s); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))" eval "$@"
}
export_eval_pack() {  # $1: the results folder (/tmp/shapes)
  local R=$1
  python3 -c "import autoencoder, text_encoder; from ldm.bundle import load_bundle, save_bundle; save_bundle(load_bundle('runs/shapes/model-ema', dtype='fp16'), '$R/model')"
  for cfg in 3 5; do
    ev --model $R/model --prompts both --n 200 --steps 25 --sampler dpmpp_2m --cfg-scale $cfg --batch-size 400 --device cuda \
       --out $R/eval-cfg$cfg -q > $R/eval-cfg$cfg.txt 2>&1
  done
  cat $R/*.txt
  (cd $(dirname $R) && tar czf $OUT/shapes.tgz --exclude=shapes/model shapes && tar cf - shapes/model | split -b 15M -d - $OUT/model.tar.part-)
  ls -la $OUT
}
