"""A split-K implicit-GEMM convolution in Triton (bench-only: it lost to cuDNN) against cuDNN, shape by shape, for
the convolutions of one SD 1.5 U-Net call; a sweep of launch configurations, and the one ``plan`` picks.

Why it was tried: at SD 1.5's 8x8 level cuDNN tiles 128 output pixels x 1280 channels into ~20-40 thread blocks
for 132 SMs (25.5 us per 3x3 convolution, 148 TFLOP/s); splitting K across programs fills the GPU. Each program
writes fp32 partial sums (splits, M, N); their sum, the bias and the cast are PyTorch ops. Result (BENCHMARKS.md,
eighth session): the kernel alone beat cuDNN only at the 8x8 level (19.4 vs 26.4 us), not once the sum over
splits is counted, and it was 1.3-2x slower at every larger shape; so it stays here.

    python bench/splitk_conv.py --batch 2 --out $OUT/splitk_conv.json

bf16, channels-last, random values. Each timing is a CUDA graph of 24 calls replayed --iters times (median ms per
call); the calls cycle through enough copies of the weight (>= 160 MB) that it comes from HBM as in the U-Net,
not from the 50 MB L2. "kernel" is the partial sums alone; "conv" adds the sum over splits, the bias and the cast
(eager: separate kernels; compiled, Inductor fuses them into the next kernel). err: max |out - fp64| / max |fp64|.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.conv_shapes import conv_shapes  # noqa: E402
from bench.conv_shapes import timed as conv_shapes_timed  # noqa: E402


class Plan(NamedTuple):
    """One launch: output tiles of block_m pixels x block_n channels, K in blocks of block_k channels of one tap,
    split over ``splits`` programs per tile."""

    block_m: int
    block_n: int
    block_k: int
    splits: int
    warps: int
    stages: int


def plan(m: int, n: int, c: int, taps: int) -> Plan | None:
    """A first guess at the launch for M output pixels, N output channels, C input channels and ``taps`` = kh * kw
    (the sweep measures the others); None outside the shapes it was meant for."""
    if c % 64 or m > _MAX_PIXELS or n < 256 or c * taps < 2048:
        return None
    block_k = 128 if c % 128 == 0 else 64
    chunks = taps * c // block_k
    block_m = 64 if m <= 64 else 128
    block_n = 128 if m <= 128 else 64
    tiles = -(-m // block_m) * -(-n // block_n)
    splits = max(1, min(chunks // 4, -(-_TARGET_PROGRAMS // tiles)))  # at least 4 K blocks per program
    return Plan(block_m, block_n, block_k, splits, 4 if block_m * block_n <= 8192 else 8, 3)


_MAX_PIXELS = 512  # SD 1.5's 16x16 level at batch 2
_TARGET_PROGRAMS = 264  # two per SM of an H100 / H200


def conv2d_splitk(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int, p: Plan) -> Tensor:
    """F.conv2d(x, weight, bias, stride, padding) through the split-K kernel: x (B, C, H, W) channels-last, weight
    (N, C, kh, kw) -> (B, N, H', W') channels-last, x's dtype; fp32 accumulation, the splits summed in fp32."""
    B, C, H, W = x.shape
    N, _, KH, KW = weight.shape
    HO, WO = (H + 2 * padding - KH) // stride + 1, (W + 2 * padding - KW) // stride + 1
    parts = conv2d_partials(x, weight, stride, padding, *p)  # (splits, B H' W', N) fp32
    out = parts.sum(0) if parts.shape[0] > 1 else parts[0]  # (B H' W', N)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).view(B, HO, WO, N).permute(0, 3, 1, 2)  # (B, N, H', W'), NHWC in memory


def conv2d_partials(x: Tensor, weight: Tensor, stride: int, padding: int, block_m: int, block_n: int, block_k: int,
                    splits: int, warps: int, stages: int) -> Tensor:  # fmt: skip
    """The kernel's partial sums: (splits, B H' W', N) fp32, split s over K blocks [s q, (s + 1) q), q =
    ceil(kh kw C / block_k / splits)."""
    import triton

    B, C, H, W = x.shape
    N, _, KH, KW = weight.shape
    HO, WO = (H + 2 * padding - KH) // stride + 1, (W + 2 * padding - KW) // stride + 1
    M = B * HO * WO
    chunks = KH * KW * C // block_k
    per_split = triton.cdiv(chunks, splits)
    parts = torch.empty((splits, M, N), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n), splits)
    _kernel()[grid](
        x, weight, parts, M, N, C, H, W, HO, WO,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        weight.stride(0), weight.stride(1), weight.stride(2), weight.stride(3),
        per_split, chunks,
        STRIDE=stride, PAD=padding, KW=KW, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return parts


@functools.cache
def _kernel():
    """The Triton kernel, defined on first use (importing this module does not import Triton)."""
    import triton
    import triton.language as tl

    @triton.jit
    def triton_conv_splitk(x_ptr, w_ptr, p_ptr, M, N, C, H, W, HO, WO, sxb, sxc, sxh, sxw, swn, swc, swh, sww,
                           per_split, chunks, STRIDE: tl.constexpr, PAD: tl.constexpr, KW: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixels (b, ho, wo) flattened
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # output channels
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < N
        b = offs_m // (HO * WO)
        r = offs_m % (HO * WO)
        h0 = (r // WO) * STRIDE - PAD  # the tap (0, 0)'s input row and column
        w0 = (r % WO) * STRIDE - PAD
        x_rows = x_ptr + b.to(tl.int64) * sxb  # (BLOCK_M,)
        w_cols = w_ptr + offs_n.to(tl.int64) * swn  # (BLOCK_N,)
        per_tap = C // BLOCK_K
        start = tl.program_id(2) * per_split
        end = tl.minimum(start + per_split, chunks)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(start, end):
            tap = kk // per_tap
            c = (kk - tap * per_tap) * BLOCK_K + offs_k  # (BLOCK_K,) input channels
            kh = tap // KW
            kw = tap - kh * KW
            hi = h0 + kh
            wi = w0 + kw
            ok = m_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)  # outside the image: the zero padding
            a = tl.load(x_rows[:, None] + hi[:, None] * sxh + wi[:, None] * sxw + c[None, :] * sxc,
                        mask=ok[:, None], other=0.0)  # (BLOCK_M, BLOCK_K)
            w = tl.load(w_cols[None, :] + c[:, None] * swc + kh * swh + kw * sww,
                        mask=n_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
            acc = tl.dot(a, w, acc)
        rows = tl.program_id(2).to(tl.int64) * M + offs_m
        tl.store(p_ptr + rows[:, None] * N + offs_n[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])

    return triton_conv_splitk  # named "triton..." so the profilers count it with the Triton kernels


def timed(fn, iters: int, reps: int = 24) -> float:
    """Median ms per call of ``fn(i)``, i cycling through 0..reps-1, ``reps`` calls captured in one CUDA graph
    (conv_shapes.timed with an index, so that the calls can cycle through weight copies)."""
    counter = itertools.count()
    return conv_shapes_timed(lambda: fn(next(counter) % reps), iters, reps)


TILES = ((64, 64, 4), (128, 64, 4), (64, 128, 4), (128, 128, 8), (64, 256, 8), (256, 64, 8))  # block_m, block_n, warps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--side", type=int, default=64)
    ap.add_argument("--max-pixels", type=int, default=2048, help="shapes with at most this many output pixels")
    ap.add_argument("--min-pixels", type=int, default=0, help="shapes with at least this many output pixels")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-sweep", action="store_true", help="time only cuDNN and plan()'s launch")
    ap.add_argument("--out", default="splitk_conv.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    rows = []
    for (xs, ws, stride, padding), calls in sorted(conv_shapes(args.batch, args.side).items()):
        B, C, H, W = xs
        N, _, KH, KW = ws
        s, p = stride[0], padding[0]
        HO, WO = (H + 2 * p - KH) // s + 1, (W + 2 * p - KW) // s + 1
        M = B * HO * WO
        if not args.min_pixels <= M <= args.max_pixels or C % 64:
            continue
        g = torch.Generator("cuda").manual_seed(0)
        cl = torch.channels_last
        x = torch.randn(xs, generator=g, device="cuda", dtype=torch.bfloat16).to(memory_format=cl)
        wbytes = 2 * N * C * KH * KW
        copies = max(2, min(16, -(-160_000_000 // wbytes)))
        ws_ = [(torch.randn(ws, generator=g, device="cuda", dtype=torch.bfloat16) * 0.02).to(memory_format=cl)
               for _ in range(copies)]  # fmt: skip
        b = torch.randn(N, generator=g, device="cuda", dtype=torch.bfloat16)
        ref = F.conv2d(x.double(), ws_[0].double(), b.double(), s, p)
        scale = ref.abs().max().item()

        def err(out):
            return (out.double() - ref).abs().max().item() / scale

        row = {"input": xs, "weight": ws, "stride": s, "calls": calls, "pixels": M, "weight_mb": wbytes / 1e6,
               "copies": copies}
        with torch.no_grad():
            row["cudnn_err"] = err(F.conv2d(x, ws_[0], b, s, p))
            row["cudnn_ms"] = timed(lambda i: F.conv2d(x, ws_[i % copies], b, s, p), args.iters)
            pl = plan(M, N, C, KH * KW)
            row["plan"] = pl._asdict() if pl else None
            if pl:
                row["plan_err"] = err(conv2d_splitk(x, ws_[0], b, s, p, pl))
                row["plan_ms"] = timed(lambda i: conv2d_splitk(x, ws_[i % copies], b, s, p, pl), args.iters)
                row["plan_kernel_ms"] = timed(lambda i: conv2d_partials(x, ws_[i % copies], s, p, *pl), args.iters)
            sweep = []
            if not args.no_sweep:
                for (bm, bn, warps), bk, stages in itertools.product(TILES, (64, 128), (3, 4)):
                    if M >= 2048 and bm < 128:
                        continue  # many pixels: small tiles only add blocks
                    if C % bk:
                        continue
                    chunks = KH * KW * C // bk
                    for splits in (1, 2, 4, 8, 16, 32) if M < 2048 else (1, 2):
                        if splits > chunks:
                            break
                        q = Plan(bm, bn, bk, splits, warps, stages)
                        try:
                            ms = timed(lambda i, q=q: conv2d_partials(x, ws_[i % copies], s, p, *q), args.iters)
                        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: record, go on
                            sweep.append({**q._asdict(), "error": f"{type(e).__name__}: {str(e)[:120]}"})
                            continue
                        sweep.append({**q._asdict(), "kernel_ms": ms})
                ok = [r for r in sweep if "kernel_ms" in r]
                best = min(ok, key=lambda r: r["kernel_ms"]) if ok else None
                if best:
                    q = Plan(*(best[k] for k in Plan._fields))
                    row["best"] = best
                    row["best_err"] = err(conv2d_splitk(x, ws_[0], b, s, p, q))
                    row["best_ms"] = timed(lambda i: conv2d_splitk(x, ws_[i % copies], b, s, p, q), args.iters)
            row["sweep"] = sweep
        flop = 2 * M * N * C * KH * KW
        row["cudnn_tflops"] = flop / row["cudnn_ms"] / 1e9
        rows.append(row)
        line = (f"x{calls:2d} in {xs} w {ws} s{s} ({M} px, {wbytes / 1e6:.1f} MB): cuDNN {row['cudnn_ms'] * 1e3:6.1f} us"
                f" ({row['cudnn_tflops']:3.0f} TF/s, {wbytes / row['cudnn_ms'] / 1e9:4.2f} TB/s)")
        if pl:
            line += f" | plan {row['plan_kernel_ms'] * 1e3:6.1f} / {row['plan_ms'] * 1e3:6.1f} us {tuple(pl)}"
        if row.get("best"):
            bq = row["best"]
            line += (f" | best {bq['kernel_ms'] * 1e3:6.1f} / {row['best_ms'] * 1e3:6.1f} us "
                     f"{tuple(bq[k] for k in Plan._fields)} ({wbytes / bq['kernel_ms'] / 1e9:4.2f} TB/s)")
        print(line, flush=True)
    tot = {"cudnn_ms": sum(r["cudnn_ms"] * r["calls"] for r in rows)}
    tot["plan_or_cudnn_ms"] = sum(min(r["cudnn_ms"], r.get("plan_ms", 1e9)) * r["calls"] for r in rows)
    tot["best_or_cudnn_ms"] = sum(min(r["cudnn_ms"], r.get("best_ms", 1e9)) * r["calls"] for r in rows)
    print("per U-Net call, these shapes (ms):", {k: round(v, 4) for k, v in tot.items()})
    Path(args.out).write_text(json.dumps({"batch": args.batch, "side": args.side, "torch": torch.__version__,
                                          "cudnn": torch.backends.cudnn.version(), "device": torch.cuda.get_device_name(),
                                          "rows": rows, "totals": tot}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
