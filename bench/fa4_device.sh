#!/usr/bin/env bash
# flash-attn-4 (and the CUTLASS DSL it compiles its kernels with) for the device host, which has no internet.
# The cu13 CUTLASS DSL wheel is 92 MB and one device call carries at most 64 MiB with the working tree, so it
# travels xz-compressed in three ~20 MiB pieces, one per call (with the ~25 MiB working tree, two would pass the
# limit), parked on the warm machine, which lets go after 30 s idle: chain the calls. Used for BENCHMARKS.md's
# FlashAttention-4 rows.
#
#   bash bench/fa4_device.sh fetch      # here (needs PyPI): fills .carry/fa_a1, fa_a2, fa_b, fa_whl, whl_lite
#   bash bench/fa4_device.sh keep       # device calls 1-3, carrying .carry/fa_a1, then fa_a2, then fa_b: parks
#                                       # the piece carried
#   source bench/fa4_device.sh install > /tmp/fa4.log 2>&1
#                                       # device call 4, carry .carry/fa_whl .carry/whl_lite: assembles the
#                                       # packages and exports PYTHONPATH (not through a pipe: a piped `source`
#                                       # runs in a subshell and the export is lost)
set -e
mode=${1:?usage: bench/fa4_device.sh fetch|keep|install}
C=.carry
case "$mode" in
fetch)
  tmp=$(mktemp -d)
  pip download -q --pre --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d "$tmp" \
    flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
    nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 "apache-tvm-ffi>=0.1.11,<0.2" \
    torch-c-dlpack-ext quack-kernels==0.6.5 protobuf cuda-pathfinder
  mkdir -p "$tmp/x" $C/fa_a1 $C/fa_a2 $C/fa_b $C/fa_whl $C/whl_lite
  (cd "$tmp/x" && python3 -m zipfile -e "$tmp"/nvidia_cutlass_dsl_libs_cu13-*.whl . && tar cf - . | xz -T0 -9 > "$tmp/cu13.tar.xz")
  (cd "$tmp" && split -n 3 -d cu13.tar.xz part)
  mv "$tmp/part00" $C/fa_a1/ && mv "$tmp/part01" $C/fa_a2/ && mv "$tmp/part02" $C/fa_b/
  rm "$tmp"/nvidia_cutlass_dsl_libs_cu13-*.whl && mv "$tmp"/*.whl $C/fa_whl/
  cp $(ls .whl/*.whl | grep -v xformers) $C/whl_lite/  # the device wheels (bash ../shared/device/wheels.sh)
  cp .whl/omegaconf-*.whl $C/fa_whl/
  rm -rf "$tmp"; du -sh $C/fa_a1 $C/fa_a2 $C/fa_b $C/fa_whl $C/whl_lite ;;
keep)
  mkdir -p $C/keep
  for d in fa_a1 fa_a2 fa_b; do if [ -d $C/$d ]; then cp $C/$d/* $C/keep/; fi; done
  ls -la $C/keep ;;
install)
  site=$PWD/$C/site
  if [ ! -d "$site/nvidia_cutlass_dsl/cu13" ]; then
    mkdir -p "$site" && cat $C/keep/part00 $C/keep/part01 $C/keep/part02 | xz -d | tar x -C "$site"
  fi
  for w in $C/fa_whl/*.whl; do  # unzipped, not pip-installed: pip --target skips a folder that exists
    case "$w" in *protobuf*|*cuda_pathfinder*) continue ;; esac
    python3 -m zipfile -e "$w" "$site"
  done
  python3 -c "import google.protobuf" 2>/dev/null || python3 -m zipfile -e $C/fa_whl/protobuf-*.whl "$site"
  python3 -c "import cuda.pathfinder" 2>/dev/null || python3 -m zipfile -e $C/fa_whl/cuda_pathfinder-*.whl "$site"
  python3 -m pip install -q --no-index --no-deps --target /tmp/site $C/whl_lite/*.whl 2>/dev/null || true
  export PYTHONPATH=/tmp/site:$site:$site/nvidia_cutlass_dsl/dsl_packages:$PWD
  python3 -c "import flash_attn.cute; print('flash-attn-4 imports')" ;;
*) echo "bench/fa4_device.sh: unknown mode $mode (fetch|keep|install)" >&2; exit 2 ;;
esac
