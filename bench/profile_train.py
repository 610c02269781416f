"""Where one SD1.5 training step's GPU time goes: torch.profiler over a few steps, kernels grouped by kind.

    python bench/profile_train.py --res 512 --batch 32 --compile default --out $OUT/profile512.txt

The step of bench/perf.py's training cases (bench/perf_train.py ``make_train_step``: fp32 weights, bf16 autocast,
fused AdamW, MSE on eps, precomputed latents and text), our U-Net with the speed switches given (random weights: the
time does not depend on them).
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.perf_train import make_train_step  # noqa: E402
from ldm.conditioning import Cond  # noqa: E402
from ldm.speed import SpeedConfig, apply_speed  # noqa: E402
from ldm.unet import UNet, UNetConfig  # noqa: E402

# first match wins: Inductor names its kernels after the ops they fuse ("triton_poi_fused__scaled_dot_product_..."),
# so "triton" is looked for before the library kernels' names
KINDS = (("triton (fused elementwise / norms)", ("triton",)),
         ("attention", ("fmha", "flash", "attention", "cudnn_generated_fort_native_sdpa", "sdpa")),
         ("gemm", ("gemm", "cutlass", "cublas", "sm90_xmma", "nvjet")),
         ("convolution", ("conv", "implicit", "xmma", "dgrad", "wgrad", "fprop")),
         ("optimizer", ("adam", "multi_tensor")),
         ("norm", ("norm",)),
         ("copy / layout", ("copy", "transpose", "nchw", "nhwc", "memcpy")),
         ("elementwise", ("elementwise", "vectorized", "reduce")))  # fmt: skip


def kind(name: str) -> str:
    low = name.lower()
    for k, keys in KINDS:
        if any(s in low for s in keys):
            return k
    return "other"


def top_kernels(per_kernel: dict, per: int, top: int, unit: str) -> list[str]:
    """The ``top`` kernels by time: ms and calls per ``unit`` (``per`` of them were profiled)."""
    lines = ["", f"top kernels (ms per {unit}, calls per {unit}):"]
    for name, (us, n) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{us / per / 1e3:8.3f} {n // per:5d}  {kind(name)[:12]:12s} {name[:150]}")
    return lines


def write_report(lines: list[str], out: str) -> None:
    text = "\n".join(lines)
    print(text)
    Path(out).write_text(text + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--compile", default="default")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--attention-kernel", default="fastest")
    ap.add_argument("--no-channels-last-grads", action="store_true",
                    help="speed.channels_last_grads=false (auto turns it on for compiled channels-last training)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="profile.txt")
    ap.add_argument("--top", type=int, default=40, help="how many kernels to list (default: %(default)s)")
    ap.add_argument("--copies", action="store_true", help="also: which operators launch the copy kernels (CPU trace)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (it profiles GPU kernels)")
    dev = "cuda"
    cfg = UNetConfig.sd15()
    with torch.device(dev):
        unet = UNet(cfg)
    unet.train()
    apply_speed(unet, SpeedConfig(compile=args.compile, channels_last=args.channels_last,
                                  attention_kernel=args.attention_kernel,
                                  channels_last_grads=False if args.no_channels_last_grads else None), training=True)
    side = args.res // 8
    g = torch.Generator(dev).manual_seed(0)
    latents = torch.randn(args.batch, 4, side, side, generator=g, device=dev)
    context = torch.randn(args.batch, 77, cfg.context_dim, generator=g, device=dev)
    step = make_train_step(lambda x, t: unet(x, t, Cond(context=context)), list(unet.parameters()), latents)

    for _ in range(4):
        step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if args.copies else [])
    with profile(activities=acts, record_shapes=args.copies) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    per_kind, per_kernel = defaultdict(float), defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        us = e.device_time if hasattr(e, "device_time") else e.cuda_time
        per_kind[kind(e.name)] += us
        per_kernel[e.name][0] += us
        per_kernel[e.name][1] += 1
    total = sum(per_kind.values())
    lines = [f"# SD1.5 training step, {args.res} px, batch {args.batch}, compile={args.compile}, "
             f"channels_last={args.channels_last}, attention={args.attention_kernel}: "
             f"{total / args.steps / 1e3:.1f} ms of GPU kernels per step", ""]
    for k, us in sorted(per_kind.items(), key=lambda kv: -kv[1]):
        lines.append(f"{k:40s} {us / args.steps / 1e3:8.2f} ms  {100 * us / total:5.1f}%")
    lines += top_kernels(per_kernel, args.steps, args.top, "step")
    if args.copies:
        lines += ["", "copy kernels by launching operator chain (ms per step, kernels per step, shapes):"]
        chains = defaultdict(lambda: [0.0, 0, ""])
        for e in prof.events():
            if e.device_type.name != "CPU" or not e.kernels:
                continue
            us = sum(k.duration for k in e.kernels if kind(k.name) == "copy / layout")
            if not us:
                continue
            chain, p = [e.name], e.cpu_parent
            while p is not None and len(chain) < 6:
                chain.append(p.name)
                p = p.cpu_parent
            key = " <- ".join(chain)
            chains[key][0] += us
            chains[key][1] += 1
            chains[key][2] = str(e.input_shapes)[:120]
        for key, (us, n, shapes) in sorted(chains.items(), key=lambda kv: -kv[1][0])[:25]:
            lines.append(f"{us / args.steps / 1e3:8.2f} {n // args.steps:5d}  {key[:260]}  {shapes}")
    write_report(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
