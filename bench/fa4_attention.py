"""Attention kernels on the SD 1.5 and SDXL U-Nets' shapes: SDPA's backends against FlashAttention-4 (the CuTe-DSL
kernels of the ``flash-attn-4`` wheel, which have Hopper paths).

    python bench/fa4_attention.py --out $OUT/fa4.json                 # CUDA, bf16, SD 1.5's shapes
    python bench/fa4_attention.py --model sdxl --out $OUT/fa4_xl.json  # SDXL's (head dim 64)

Kernels: SDPA's cuDNN, flash (FA2) and memory-efficient; ``fa4`` (FlashAttention-4 called directly); ``fa4-pad32``:
FA4 on q, k, v zero-padded to a head dim that is a multiple of 32 (40 -> 64, 80 -> 96; the scale stays 1/sqrt(d)),
the output sliced back: the same formula, to test whether the wrong gradients at head dims 40 and 80 are the padding
path's; ``ldm-fa4``: ldm/attention_fa4.py's custom ops (what the U-Net runs with ``attention_kernel=fa4``: FA4's
forward alone without gradients, forward + backward on heads padded to a multiple of 32 with them); ``--torch-route``: also SDPA's flash backend after ``activate_flash_attention_impl("FA4")``.

For each shape: forward time (batch 2 and 16, inference) and forward + backward time (batch 32, training), each a
median of CUDA-event-timed calls, and the largest error against the fp32 formula (ldm.attention.math_attention; its
gradients for the backward). The sum over the U-Net's attention calls (SD 1.5 per level: 5 self- and 5
cross-attention calls, 1 of each in the middle block; SDXL at a 128x128 latent: 10 at 64x64, 60 at 32x32) gives the attention time of one U-Net step per backend.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.perf_measure import Plan, median_ms  # noqa: E402
from ldm.attention import math_attention  # noqa: E402

# (tokens, heads, head dim, calls per U-Net forward); each call is a self- and a cross-attention
LEVELS = {
    "sd15": ((4096, 8, 40, 5), (1024, 8, 80, 5), (256, 8, 160, 5), (64, 8, 160, 1)),  # 64x64 latent
    "sdxl": ((4096, 10, 64, 10), (1024, 20, 64, 60)),  # 128x128 latent
}
TEXT_TOKENS = 77


def sdpa_fn(backend):
    def run(q, k, v):  # (B, heads, L, d)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def fa4_direct():
    from flash_attn.cute import flash_attn_func

    def run(q, k, v):  # FA4 takes (B, L, heads, d): the transposes are views of the projections' layout
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(1, 2)
    return run


def fa4_padded(multiple=32):
    from flash_attn.cute import flash_attn_func

    def run(q, k, v):  # zero columns add nothing to q.k or to the output; the scale is the unpadded one
        d = q.shape[-1]
        pad = -d % multiple
        qp, kp, vp = (torch.nn.functional.pad(t.transpose(1, 2), (0, pad)) for t in (q, k, v))
        out = flash_attn_func(qp, kp, vp, softmax_scale=d ** -0.5)
        out = out[0] if isinstance(out, tuple) else out
        return out[..., :d].transpose(1, 2)
    return run


def make_qkv(b, lq, lk, heads, d, dtype, grad=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    # projections give (B, L, heads*d); attention sees the (B, heads, L, d) view, as in ldm/transformer.py
    q = torch.randn(b, lq, heads, d, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
    k = torch.randn(b, lk, heads, d, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
    v = torch.randn(b, lk, heads, d, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
    if grad:
        q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    return q, k, v


def errors(fn, lq, lk, heads, d, dtype):
    """Largest |error| of the output (batch 2) and of dq, dk, dv against the fp32 formula."""
    q, k, v = make_qkv(2, lq, lk, heads, d, dtype, grad=True, seed=1)
    out = fn(q, k, v)
    go = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), go)
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    ref = math_attention(q32, k32, v32)
    rq, rk, rv = torch.autograd.grad(ref, (q32, k32, v32), go.float())
    return {"out": (out.float() - ref).abs().max().item(),
            "grad": max((a.float() - r).abs().max().item() for a, r in ((dq, rq), (dk, rk), (dv, rv)))}


def time_case(fn, plan, b, lq, lk, heads, d, dtype, train):
    q, k, v = make_qkv(b, lq, lk, heads, d, dtype, grad=train)
    if not train:
        with torch.inference_mode():
            return median_ms(lambda: fn(q, k, v), plan)
    go = torch.randn(b, heads, lq, d, device="cuda", dtype=dtype)

    def step():
        out = fn(q, k, v)
        torch.autograd.grad(out, (q, k, v), go)
    return median_ms(step, plan)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--reps", type=int, default=30, help="timed calls per case (median)")
    p.add_argument("--train-batch", type=int, default=32, help="batch of the forward+backward cases")
    p.add_argument("--model", default="sd15", choices=tuple(LEVELS), help="whose attention shapes")
    p.add_argument("--kernels", default="", help="comma-separated subset of the kernels (default: all)")
    p.add_argument("--torch-route", action="store_true",
                   help="also time FA4 through activate_flash_attention_impl (failed with torch 2.11 + FA4 4.0.0b36)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/fa4_attention.py: needs a CUDA GPU")
    dtype = torch.bfloat16
    plan = Plan(device="cuda", dtype=dtype, tiny=False, warmup=5, reps=args.reps, train_reps=args.reps, peak=790.0,
                tol=0.0)
    fns = {"cudnn": sdpa_fn(SDPBackend.CUDNN_ATTENTION), "flash2": sdpa_fn(SDPBackend.FLASH_ATTENTION),
           "efficient": sdpa_fn(SDPBackend.EFFICIENT_ATTENTION)}
    meta = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "dtype": str(dtype), "model": args.model}
    try:
        import flash_attn.cute  # noqa: F401
        fns["fa4"] = fa4_direct()
        fns["fa4-pad32"] = fa4_padded(32)
        from ldm.attention_fa4 import fa4_attention
        fns["ldm-fa4"] = fa4_attention  # inference: FA4 forward alone; training: forward + backward, heads padded
        meta["fa4_import"] = "ok"
    except Exception as e:  # not installed, or its CUDA libraries do not load here
        meta["fa4_import"] = f"{type(e).__name__}: {e}"
    try:
        from torch.nn.attention import activate_flash_attention_impl, list_flash_attention_impls
        meta["torch_flash_impls"] = list_flash_attention_impls()
    except ImportError as e:
        activate_flash_attention_impl = None
        meta["torch_flash_impls"] = f"ImportError: {e}"
    print(json.dumps(meta), flush=True)

    levels = LEVELS[args.model]
    rows = []

    def run_all(name, fn):
        for lq, heads, d, calls in levels:
            for kind, lk in (("self", lq), ("cross", TEXT_TOKENS)):
                row = {"kind": kind, "tokens": lq, "keys": lk, "heads": heads, "head_dim": d, "calls": calls,
                       "kernel": name}
                try:
                    t0 = time.perf_counter()
                    row.update(errors(fn, lq, lk, heads, d, dtype))
                    row["first_call_s"] = round(time.perf_counter() - t0, 2)  # FA4 compiles its kernels here
                    row["fwd_b2_ms"] = time_case(fn, plan, 2, lq, lk, heads, d, dtype, False)
                    row["fwd_b16_ms"] = time_case(fn, plan, 16, lq, lk, heads, d, dtype, False)
                    row[f"fwdbwd_b{args.train_batch}_ms"] = time_case(fn, plan, args.train_batch, lq, lk, heads, d,
                                                                      dtype, True)
                except Exception as e:  # a kernel that cannot run this shape: recorded, not fatal
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                rows.append(row)
                print(json.dumps(row), flush=True)

    for name, fn in fns.items():
        if not args.kernels or name in args.kernels.split(","):
            run_all(name, fn)
    if args.torch_route and activate_flash_attention_impl is not None and "fa4" in fns:
        try:  # the same kernels through SDPA's flash backend (process-wide; last, so the others are unaffected)
            activate_flash_attention_impl("FA4")
            meta["torch_fa4_activated"] = True
            run_all("sdpa-fa4", sdpa_fn(SDPBackend.FLASH_ATTENTION))
        except Exception as e:
            meta["torch_fa4_activated"] = f"{type(e).__name__}: {e}"

    # per-U-Net-step totals: sum of calls x time over the levels, for each kernel and timing column
    cols = ("fwd_b2_ms", "fwd_b16_ms", f"fwdbwd_b{args.train_batch}_ms")
    totals = {}
    for name in sorted({r["kernel"] for r in rows}):
        mine = [r for r in rows if r["kernel"] == name]
        totals[name] = {c: (round(sum(r["calls"] * r[c] for r in mine), 3)
                            if all(c in r for r in mine) and len(mine) == 2 * len(levels) else None) for c in cols}
    print("\nattention time per U-Net step (ms):")
    print(f"{'kernel':>10} " + " ".join(f"{c:>16}" for c in cols))
    for name, t in totals.items():
        print(f"{name:>10} " + " ".join(f"{'-' if t[c] is None else t[c]:>16}" for c in cols))
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "totals": totals}, indent=1))


if __name__ == "__main__":
    main()
