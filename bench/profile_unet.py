"""Where one SD1.5 U-Net inference call's GPU time goes (the CFG step: batch 2, 64x64 latents), and how much of the
call is kernels at all: torch.profiler over a few calls of the compiled body without CUDA graphs (so each kernel is
seen), then the same body replayed from a CUDA graph, timed with CUDA events.

    python bench/profile_unet.py --batch 2 --out $OUT/profile_unet_b2.txt

"kernel time" is the sum of kernel durations per call; "graph replay" minus it is what the GPU spends between
kernels (the per-kernel scheduling cost that only fewer kernels remove). bf16 weights, random values.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.inductor_flags import add_inductor_flag, apply_inductor_flags  # noqa: E402
from bench.profile_train import kind, top_kernels, write_report  # noqa: E402
from ldm.conditioning import Cond  # noqa: E402
from ldm.speed import CUDAGraphForward, SpeedConfig, apply_speed  # noqa: E402
from ldm.unet import UNet, UNetConfig  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--side", type=int, default=64, help="latent side (default: %(default)s)")
    ap.add_argument("--attention-kernel", default="fastest")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--top", type=int, default=40, help="how many kernels to list (default: %(default)s)")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="torch.backends.cudnn.benchmark = True: time each convolution's algorithms at the first call")
    ap.add_argument("--benchmark-limit", type=int, default=10,
                    help="with --cudnn-benchmark: how many of cuDNN's engine configurations to time per convolution, "
                         "0 for all (torch.backends.cudnn.benchmark_limit; default: %(default)s, PyTorch's)")
    ap.add_argument("--trace", default="", help="also write the profiled calls' Chrome trace here (kernel grids)")
    ap.add_argument("--code", default="",
                    help="also copy Inductor's generated module(s) for the U-Net here (the Triton kernels' source)")
    ap.add_argument("--no-nhwc-group-norm", action="store_true",
                    help="speed.nhwc_group_norm=false (auto: on when compiled): Inductor's own GroupNorm")
    ap.add_argument("--triton-group-norm", action="store_true",
                    help="speed.triton_group_norm=true (ldm/group_norm_triton.py)")
    ap.add_argument("--no-fused-emb", action="store_true", help="speed.fused_emb=false (auto: on for CUDA inference)")
    ap.add_argument("--no-fused-context-kv", action="store_true",
                    help="speed.fused_context_kv=false (auto: on for CUDA inference)")
    ap.add_argument("--plain-cat", action="store_true",
                    help="the up path's skip concatenations as plain torch.cat (the layout Inductor picks) instead of "
                         "ldm's channels-last cat_channels")
    add_inductor_flag(ap)
    ap.add_argument("--out", default="profile_unet.txt")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (it profiles GPU kernels)")
    apply_inductor_flags(ap, args.inductor)
    if args.code:
        import os
        import tempfile

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir = tempfile.mkdtemp(prefix="inductor_")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    torch.backends.cudnn.benchmark_limit = args.benchmark_limit
    if args.plain_cat:
        import ldm.unet

        ldm.unet.cat_channels = lambda h, skip: torch.cat([h, skip], dim=1)
    cfg = UNetConfig.sd15()
    with torch.device("cuda"):
        unet = UNet(cfg).to(torch.bfloat16).eval()
    speed = SpeedConfig(compile="default", channels_last=True, cuda_graphs=False, attention_kernel=args.attention_kernel,
                        nhwc_group_norm=False if args.no_nhwc_group_norm else None,
                        triton_group_norm=True if args.triton_group_norm else None,
                        fused_emb=False if args.no_fused_emb else None,
                        fused_context_kv=False if args.no_fused_context_kv else None)
    applied = apply_speed(unet, speed)
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(args.batch, 4, args.side, args.side, generator=g, device="cuda", dtype=torch.bfloat16)
    t = torch.full((args.batch,), 500, device="cuda")
    cond = Cond(context=torch.randn(args.batch, 77, cfg.context_dim, generator=g, device="cuda", dtype=torch.bfloat16))
    with torch.no_grad():
        for _ in range(3):
            unet(x, t, cond)
        torch.cuda.synchronize()
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.calls):
                unet(x, t, cond)
            torch.cuda.synchronize()
        if args.trace:
            prof.export_chrome_trace(args.trace)
        graphed = CUDAGraphForward(unet.forward)
        for _ in range(3):
            graphed(x, t, cond)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(30):
            start.record()
            graphed(x, t, cond)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    replay = sorted(times)[len(times) // 2]
    per_kind, per_kernel = defaultdict(float), defaultdict(lambda: [0.0, 0])
    n_kernels = 0
    for e in prof.events():
        if e.device_type.name != "CUDA" or e.name.startswith("## "):  # "## Call CompiledFxGraph": a range, no kernel
            continue
        us = e.device_time if hasattr(e, "device_time") else e.cuda_time
        per_kind[kind(e.name)] += us
        per_kernel[e.name][0] += us
        per_kernel[e.name][1] += 1
        n_kernels += 1
    total = sum(per_kind.values()) / args.calls / 1e3
    n = n_kernels / args.calls
    lines = [f"# SD1.5 U-Net call, batch {args.batch}, {args.side}x{args.side} latents, bf16, cudnn.benchmark="
             f"{args.cudnn_benchmark} (limit {args.benchmark_limit}), "
             f"skip cat {'plain' if args.plain_cat else 'channels-last'}"
             + (f", inductor {' '.join(args.inductor)}" if args.inductor else ""),
             f"# speed: {applied.describe()}",
             f"kernels per call {n:.0f}; kernel time {total:.2f} ms per call; CUDA-graph replay {replay:.2f} ms "
             f"(median of 30): {replay - total:.2f} ms between kernels, {1e3 * (replay - total) / n:.2f} us per kernel",
             ""]
    for k, us in sorted(per_kind.items(), key=lambda kv: -kv[1]):
        lines.append(f"{k:40s} {us / args.calls / 1e3:8.3f} ms  {100 * us / total / args.calls / 1e3:5.1f}%  "
                     f"{sum(c for nm, (_, c) in per_kernel.items() if kind(nm) == k) // args.calls:5d} kernels")
    lines += top_kernels(per_kernel, args.calls, args.top, "call")
    if args.code:
        lines += ["", *copy_generated_code(cache_dir, args.code)]
    write_report(lines, args.out)
    return 0


def copy_generated_code(cache_dir: str, dest: str) -> list[str]:
    """Inductor's output modules (the ones that launch kernels: they define ``call``) from its cache into ``dest``."""
    import shutil

    Path(dest).mkdir(parents=True, exist_ok=True)
    found = [p for p in Path(cache_dir).rglob("*.py") if "def call(" in p.read_text(errors="ignore")]
    for p in found:
        shutil.copy(p, Path(dest) / p.name)
    return [f"generated modules copied to {dest}: {', '.join(p.name for p in found) or 'none found'}"]


if __name__ == "__main__":
    raise SystemExit(main())
