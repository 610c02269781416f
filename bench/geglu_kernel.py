"""GEGLU's activation (``a * gelu(gate)``) forward + backward on SD 1.5's training shapes: Inductor's kernels
against ldm/geglu.py's one-pass Triton backward.

    python bench/geglu_kernel.py --out $OUT/geglu.json        # CUDA, bf16, 512 px batch 32 shapes

Variants, each timed forward alone and forward + backward (``torch.autograd.grad``; CUDA events, median of 30):
``eager`` (the plain formula, PyTorch's kernels), ``inductor`` (the plain formula under torch.compile: what the
compiled training step runs without ldm's kernel), ``ldm`` (ldm.geglu.geglu under torch.compile), ``ldm-eager``.
The backward alone is the difference. Also the backward kernels by themselves: ``geglu_backward`` (the Triton
kernel) and Inductor's compilation of the same formula (``geglu_backward_reference``). Error: max |grad - fp32
autograd of the plain formula| / max |fp32 grad|. Floor: the bytes the backward must move (read h and g, write
grad_h) at 4.8 TB/s (H200 HBM3e).
"""
from __future__ import annotations

import argparse
import json
import sys
from types import SimpleNamespace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.perf_measure import median_ms  # noqa: E402
from ldm.geglu import geglu, geglu_backward, geglu_backward_reference  # noqa: E402

# (tokens per image, GEGLU width I, calls per U-Net forward) for SD 1.5 at a 64x64 latent
LEVELS = ((4096, 1280, 5), (1024, 2560, 5), (256, 5120, 5), (64, 5120, 1))
HBM_BYTES_PER_S = 4.8e12


def plain(h):
    a, gate = h.chunk(2, dim=-1)
    return a * F.gelu(gate)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/geglu_kernel.py: needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    plan = SimpleNamespace(device="cuda", warmup=5, reps=args.reps)
    variants = {"eager": plain, "inductor": torch.compile(plain, dynamic=False), "ldm": torch.compile(geglu, dynamic=False),
                "ldm-eager": geglu}  # fmt: skip
    bwd_kernels = {"geglu_backward (Triton)": geglu_backward,
                   "inductor(geglu_backward_reference)": torch.compile(geglu_backward_reference, dynamic=False)}
    rows_out, totals = [], {}
    for tokens, width, calls in LEVELS:
        torch.manual_seed(0)
        h = torch.randn(args.batch, tokens, 2 * width, device="cuda", dtype=dtype, requires_grad=True)
        g = torch.randn(args.batch, tokens, width, device="cuda", dtype=dtype)
        h32 = h.detach().float().requires_grad_()
        (ref,) = torch.autograd.grad(plain(h32), h32, g.float())
        floor_ms = 1e3 * (h.numel() * 2 + g.numel()) * h.element_size() / HBM_BYTES_PER_S
        for name, fn in variants.items():
            def fwd():
                return fn(h)

            def fwd_bwd():
                return torch.autograd.grad(fn(h), h, g)

            t_f = median_ms(fwd, plan)
            t_fb = median_ms(fwd_bwd, plan)
            (grad,) = fwd_bwd()
            err = ((grad.float() - ref).abs().max() / ref.abs().max()).item()
            row = {"tokens": tokens, "width": width, "variant": name, "fwd_ms": t_f, "fwd_bwd_ms": t_fb,
                   "bwd_ms": t_fb - t_f, "floor_bwd_ms": floor_ms, "err": err}  # fmt: skip
            rows_out.append(row)
            totals[name] = totals.get(name, 0.0) + calls * (t_fb - t_f)
            print(f"{tokens:5d} x {width:5d}  {name:10s} fwd {t_f:7.3f}  fwd+bwd {t_fb:7.3f}  bwd {t_fb - t_f:7.3f} ms"
                  f"  (floor {floor_ms:.3f})  err {err:.1e}", flush=True)  # fmt: skip
        hd = h.detach()
        for name, fn in bwd_kernels.items():
            t = median_ms(lambda: fn(hd, g), plan)
            err = ((fn(hd, g).float() - ref).abs().max() / ref.abs().max()).item()
            rows_out.append({"tokens": tokens, "width": width, "variant": name, "bwd_ms": t, "floor_bwd_ms": floor_ms,
                             "err": err})  # fmt: skip
            totals[name] = totals.get(name, 0.0) + calls * t
            print(f"{tokens:5d} x {width:5d}  {name:36s} {t:7.3f} ms  (floor {floor_ms:.3f})  err {err:.1e}", flush=True)
    print("backward per U-Net training step (ms):", {k: round(v, 2) for k, v in totals.items()})
    if args.out:
        meta = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "batch": args.batch,
                "dtype": args.dtype}  # fmt: skip
        args.out.write_text(json.dumps({"meta": meta, "rows": rows_out, "bwd_per_step_ms": totals}, indent=1))


if __name__ == "__main__":
    main()
