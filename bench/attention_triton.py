"""A Triton attention forward (FlashAttention's online softmax, Dao et al. 2022; below) against SDPA's kernels at the
U-Nets' shapes, batch 2. Bench-only: it lost to cuDNN where the time is (BENCHMARKS.md, tenth session).

    python bench/attention_triton.py --out $OUT/attention_triton.json

For each shape: SDPA's cuDNN, flash and memory-efficient kernels, then a sweep of the Triton kernel's tile
configurations and modes:
- plain: fp32 exponentials, the row sums reduced in registers;
- ``ones``: a spare lane of V's tile (head dims that are not a power of two are zero-padded in the tile) set to ones,
  so P V also gives each row's sum of P: the normaliser from the tensor cores instead of a row reduction;
- ``exp16``: the exponentials as ``ex2.approx.f16x2`` (two per special-function instruction; the exponent rounded to
  fp16), P and V multiplied in fp16 (V must fit fp16). Each timing is
bench/conv_shapes.py's ``timed``: 20 calls in a CUDA graph, replayed, median ms per call. err: max |out - ref| /
max |ref| against the fp32 formula (ldm.attention.math_attention); bf16 rounding of the output alone is ~4e-3.
q, k and v are views of one (B, L, 3 * heads * d) projection, as the U-Net's fused q/k/v gives them.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.conv_shapes import timed  # noqa: E402
from ldm.attention import math_attention  # noqa: E402


@triton.jit
def _exp2_f16(x):
    return tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [x.to(tl.float16)], dtype=tl.float16,
                                     is_pure=True, pack=2)  # fmt: skip


@triton.jit
def _attention_fwd(Q, K, V, O, s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl, s_ob, s_oh, s_ol,
                   heads, lq, lk, qk_scale,  # qk_scale: 1/sqrt(d) * log2(e), so exp(s / sqrt(d)) = exp2(s * qk_scale)
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   ONES: tl.constexpr, EXP16: tl.constexpr, EVEN_N: tl.constexpr):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query positions
    cols = tl.arange(0, BLOCK_D)  # (BLOCK_D,) head-dim lanes, >= D masked
    keys = tl.arange(0, BLOCK_N)
    dmask = cols < D
    q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_ql + cols[None, :],
                mask=(rows[:, None] < lq) & dmask[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)  # fmt: skip
    k_base = K + b * s_kb + h * s_kh + cols[:, None]  # k read transposed: (BLOCK_D, BLOCK_N)
    v_base = V + b * s_vb + h * s_vh + cols[None, :]
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, lk, BLOCK_N):
        n = start + keys
        if EVEN_N:
            k = tl.load(k_base + n[None, :] * s_kl, mask=dmask[:, None], other=0.0)
            v = tl.load(v_base + n[:, None] * s_vl, mask=dmask[None, :], other=0.0)
        else:
            k = tl.load(k_base + n[None, :] * s_kl, mask=dmask[:, None] & (n[None, :] < lk), other=0.0)
            v = tl.load(v_base + n[:, None] * s_vl, mask=dmask[None, :] & (n[:, None] < lk), other=0.0)
        s = tl.dot(q, k)  # (BLOCK_M, BLOCK_N) fp32
        if not EVEN_N:
            s = tl.where(n[None, :] < lk, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        x = s * qk_scale - m_new[:, None]  # <= 0
        alpha = tl.math.exp2(m_i - m_new)
        acc = acc * alpha[:, None]
        if ONES:
            v = tl.where(cols[None, :] == D, 1.0, v).to(v.dtype)  # P V's column D: the rows' sums of P
        if EXP16:
            p = _exp2_f16(x)
            acc = tl.dot(p, v.to(tl.float16), acc)
        else:
            p = tl.math.exp2(x)
            if not ONES:
                l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    if ONES:
        l_i = tl.sum(tl.where(cols[None, :] == D, acc, 0.0), 1)
    out = acc / l_i[:, None]
    tl.store(O + b * s_ob + h * s_oh + rows[:, None] * s_ol + cols[None, :], out.to(O.dtype.element_ty),
             mask=(rows[:, None] < lq) & dmask[None, :])  # fmt: skip


def triton_attention(q: Tensor, k: Tensor, v: Tensor, block_m: int = 128, block_n: int = 64, num_warps: int = 4,
                     num_stages: int = 2, ones: bool | None = None, exp16: bool = False) -> Tensor:  # fmt: skip
    """softmax(Q K^T / sqrt(d)) V: q (B, heads, Lq, d), k and v (B, heads, Lk, d), fp16/bf16 CUDA tensors ->
    (B, heads, Lq, d), a view of a (B, Lq, heads, d) tensor. ``ones`` (default: where the head dim leaves a spare
    lane) and ``exp16``: the module docstring."""
    b, heads, lq, d = q.shape
    lk = k.shape[2]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))  # head-dim lanes contiguous
    block_d = max(16, triton.next_power_of_2(d + (1 if ones or exp16 else 0)))
    if ones is None:
        ones = d < block_d
    if (ones or exp16) and d >= block_d:
        raise ValueError(f"triton_attention: ones/exp16 need a spare lane; head dim {d} fills {block_d}")
    out = torch.empty(b, lq, heads, d, device=q.device, dtype=q.dtype).transpose(1, 2)  # (B, heads, Lq, d) view
    grid = (triton.cdiv(lq, block_m), b * heads)
    _attention_fwd[grid](q, k, v, out, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
                         heads, lq, lk, d**-0.5 * math.log2(math.e), D=d, BLOCK_M=block_m, BLOCK_N=block_n,
                         BLOCK_D=block_d, ONES=bool(ones or exp16), EXP16=exp16, EVEN_N=lk % block_n == 0,
                         num_warps=num_warps, num_stages=num_stages)  # fmt: skip
    return out


# (name, query tokens, key tokens, heads, head dim, calls per U-Net forward)
SHAPES = {
    "sd15": [("64x64 self", 4096, 4096, 8, 40, 5), ("64x64 cross", 4096, 77, 8, 40, 5),
             ("32x32 self", 1024, 1024, 8, 80, 5), ("32x32 cross", 1024, 77, 8, 80, 5),
             ("16x16 self", 256, 256, 8, 160, 5)],
    "sdxl": [("64x64 self", 4096, 4096, 10, 64, 10), ("32x32 self", 1024, 1024, 20, 64, 60)],
}  # fmt: skip


def qkv_views(b, lq, lk, heads, d, dtype, seed):
    g = torch.Generator("cuda").manual_seed(seed)
    if lq == lk:  # self-attention: one fused projection
        qkv = torch.randn(b, lq, 3, heads, d, device="cuda", generator=g).to(dtype)
        return tuple(qkv[:, :, i].transpose(1, 2) for i in range(3))
    q = torch.randn(b, lq, heads, d, device="cuda", generator=g).to(dtype).transpose(1, 2)
    kv = torch.randn(b, lk, 2, heads, d, device="cuda", generator=g).to(dtype)
    return q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)


def sdpa(backend):
    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SHAPES), action="append", help="default: both")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--full-sweep", action="store_true", help="every tile configuration at every shape")
    ap.add_argument("--out", default="attention_triton.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    rows = []
    for model in args.model or sorted(SHAPES):
        for name, lq, lk, heads, d, calls in SHAPES[model]:
            q, k, v = qkv_views(args.batch, lq, lk, heads, d, torch.bfloat16, seed=lq + d)
            ref = math_attention(q.float(), k.float(), v.float())

            def err(out):
                return ((out.float() - ref).abs().max() / ref.abs().max()).item()

            def record(kernel, fn, **extra):
                try:
                    with torch.no_grad():
                        e = err(fn(q, k, v))
                        ms = timed(lambda: fn(q, k, v), args.iters)
                except Exception as ex:  # a kernel that cannot run this shape
                    print(f"{model} {name} {kernel} {extra}: {type(ex).__name__}: {str(ex)[:200]}", flush=True)
                    return None
                row = {"model": model, "shape": name, "lq": lq, "lk": lk, "heads": heads, "d": d, "calls": calls,
                       "kernel": kernel, **extra, "us": ms * 1e3, "err": e}  # fmt: skip
                rows.append(row)
                return row

            for kernel, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                                    ("efficient", SDPBackend.EFFICIENT_ATTENTION)):  # fmt: skip
                r = record(kernel, sdpa(backend))
                if r:
                    print(f"{model} {name}: {kernel} {r['us']:.1f} us err {r['err']:.1e}", flush=True)
            spare = d < max(16, 1 << (d - 1).bit_length())
            modes = [(False, False)] + ([(True, False), (True, True)] if spare else [])
            wide = args.full_sweep or (lq == lk and lk >= 4096)
            tiles = list(itertools.product((64, 128), (32, 64, 128) if wide else (64, 128), (4, 8),
                                           (2, 3)))  # fmt: skip
            for ones, exp16 in modes:
                timed_rows = []
                for bm, bn, warps, stages in tiles:
                    if lk < 128 and bn != 128 and not wide:
                        continue
                    cfg = dict(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages, ones=ones, exp16=exp16)
                    r = record("triton", lambda q, k, v, cfg=cfg: triton_attention(q, k, v, **cfg), **cfg)
                    timed_rows += [r] if r else []
                if timed_rows:
                    top = min(timed_rows, key=lambda x: x["us"])
                    print(f"{model} {name}: triton ones={ones} exp16={exp16} best {top['us']:.1f} us "
                          f"err {top['err']:.1e} ({top})", flush=True)  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                          "rows": rows}, indent=1))  # fmt: skip
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
