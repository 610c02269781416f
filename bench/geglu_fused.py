"""GEGLU's projection + activation at SD 1.5's CFG-step shapes: Inductor's compilation of ``F.linear`` then
``a * gelu(gate)`` (cuBLAS GEMM writing h, then a fused elementwise kernel: what the compiled U-Net runs) against
one Triton kernel (here, bench-only: it lost), for a sweep of its tiles, with pointer loads and with TMA loads.

The kernel: out = (x Wa^T + ba) * gelu(x Wg^T + bg), [Wa; Wg] = proj.weight (2 I, K). Each program computes the same
(block_m, block_n) tile of both halves from one pass over x's rows (two MMAs per K step sharing the x tile), adds the
biases and applies a * gelu(gate) (exact erf GELU) to the fp32 accumulators before the one rounding. Why it was
tried: unfused, the projection writes h = (M, 2 I) and a second kernel reads it back (at the 64x64 level a 27 us GEMM
then a 19.5 us elementwise kernel). Result (BENCHMARKS.md, eighth session): 46.6 vs 48.1 us at the 64x64 level,
slower at the others (the Triton GEMM reaches 290-400 TFLOP/s where cuBLAS's runs at ~500): -8 us per U-Net call.

    python bench/geglu_fused.py --out $OUT/geglu_fused.json

bf16, random values; each timing is a CUDA graph of 24 calls cycling through weight copies (>= 160 MB, so weights
come from HBM), median us per call of --iters replays. err: max |out - fp64 formula| / max |fp64|.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.splitk_conv import timed  # noqa: E402
from ldm.geglu import geglu_plain  # noqa: E402


class Tiles(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    warps: int
    stages: int


DEFAULT_TILES = Tiles(128, 128, 64, 8, 8, 3)


def geglu_linear(x: Tensor, weight: Tensor, bias: Tensor | None, tiles: Tiles = DEFAULT_TILES) -> Tensor:
    """x (..., K), weight (2 I, K), bias (2 I,) or None -> (..., I) in x's dtype: the GEGLU of ``F.linear(x,
    weight, bias)`` through the fused kernel (fp32 accumulation and activation)."""
    two_i, k = weight.shape
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if bias is None:
        bias = weight.new_zeros(two_i)
    out = geglu_linear_op(x2, weight.contiguous(), bias, *tiles)  # (M, I)
    return out.view(*x.shape[:-1], two_i // 2)


def geglu_linear_op(x: Tensor, weight: Tensor, bias: Tensor, block_m: int, block_n: int, block_k: int, group_m: int,
                    warps: int, stages: int) -> Tensor:  # fmt: skip
    """x (M, K) with unit column stride, weight (2 I, K) contiguous, bias (2 I,) -> (M, I)."""
    import triton

    m, k = x.shape
    i = weight.shape[0] // 2
    out = torch.empty((m, i), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(i, block_n),)
    _kernel()[grid](
        x, weight, bias, out, m, i, k, x.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        EVEN_K=k % block_k == 0, IEEE=x.dtype == torch.float32, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


@functools.cache
def _kernel():
    """The Triton kernel, defined on first use (importing this module does not import Triton)."""
    import triton
    import triton.language as tl

    @triton.jit
    def triton_geglu_linear(x_ptr, w_ptr, b_ptr, out_ptr, M, I, K, sxm, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                            EVEN_K: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
        # tiles in groups of GROUP_M rows of tiles, so that neighbouring programs share x's rows in L2
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(I, BLOCK_N)
        per_group = GROUP_M * tiles_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < I
        x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * sxm + offs_k[None, :]  # (BLOCK_M, BLOCK_K)
        wa_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * K + offs_k[:, None]  # (BLOCK_K, BLOCK_N): Wa^T's tile
        wg_ptrs = wa_ptrs + I.to(tl.int64) * K  # Wg^T's tile: rows I.. of the weight
        acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        precision: tl.constexpr = "ieee" if IEEE else "tf32"  # fp32 inputs: exact products, never TF32
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                xt = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
                wa = tl.load(wa_ptrs, mask=n_ok[None, :], other=0.0)
                wg = tl.load(wg_ptrs, mask=n_ok[None, :], other=0.0)
            else:
                k_ok = offs_k < K - kb * BLOCK_K
                xt = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                wa = tl.load(wa_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                wg = tl.load(wg_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc_a = tl.dot(xt, wa, acc_a, input_precision=precision)
            acc_g = tl.dot(xt, wg, acc_g, input_precision=precision)
            x_ptrs += BLOCK_K
            wa_ptrs += BLOCK_K
            wg_ptrs += BLOCK_K
        a = acc_a + tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        gate = acc_g + tl.load(b_ptr + I + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = a * (0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)))  # a * gelu(gate), exact GELU
        o_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * I + offs_n[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    return triton_geglu_linear  # named "triton..." so the profilers count it with the Triton kernels


def geglu_linear_tma(x, weight, bias, t: Tiles):
    """The same kernel with its tiles loaded by TMA (device-side tensor descriptors) instead of pointer loads; needs
    I % block_n == 0 (the gate half's tile must not run into the next rows)."""
    import triton

    m, k = x.shape
    i = weight.shape[0] // 2
    assert i % t.block_n == 0 and k % t.block_k == 0
    out = torch.empty((m, i), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, t.block_m) * (i // t.block_n),)
    _tma_kernel()[grid](x, weight, bias, out, m, i, k, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
                        GROUP_M=t.group_m, num_warps=t.warps, num_stages=t.stages)
    return out


@functools.cache
def _tma_kernel():
    import triton
    import triton.language as tl

    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, device="cuda", dtype=torch.int8))

    @triton.jit
    def triton_geglu_linear_tma(x_ptr, w_ptr, b_ptr, out_ptr, M, I, K, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = I // BLOCK_N
        per_group = GROUP_M * tiles_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[2 * I, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
        acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, K // BLOCK_K):
            xt = x_desc.load([pid_m * BLOCK_M, kb * BLOCK_K])
            wa = w_desc.load([pid_n * BLOCK_N, kb * BLOCK_K])
            wg = w_desc.load([I + pid_n * BLOCK_N, kb * BLOCK_K])
            acc_a = tl.dot(xt, wa.T, acc_a)
            acc_g = tl.dot(xt, wg.T, acc_g)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        a = acc_a + tl.load(b_ptr + offs_n).to(tl.float32)[None, :]
        gate = acc_g + tl.load(b_ptr + I + offs_n).to(tl.float32)[None, :]
        out = a * (0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)))
        o_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * I + offs_n[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None])

    return triton_geglu_linear_tma

# (tokens of the CFG batch, model width K, GEGLU width I, calls per U-Net call): SD 1.5 at 64x64, batch 2
LEVELS = ((8192, 320, 1280, 5), (2048, 640, 2560, 5), (512, 1280, 5120, 5), (128, 1280, 5120, 1))
SWEEP = [Tiles(bm, bn, bk, 8, w, s) for bm, bn, bk, w in ((128, 128, 64, 8), (128, 64, 64, 4), (64, 128, 64, 4),
                                                         (64, 64, 64, 4), (128, 128, 32, 8), (256, 64, 64, 8),
                                                         (64, 64, 128, 4), (128, 64, 128, 8))
         for s in (3, 4, 5)]  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default="geglu_fused.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    rows, tot = [], {"inductor_us": 0.0, "best_us": 0.0}
    for m, k, i, calls in LEVELS:
        g = torch.Generator("cuda").manual_seed(0)
        x = torch.randn(m, k, generator=g, device="cuda", dtype=torch.bfloat16)
        copies = max(2, min(16, -(-160_000_000 // (2 * 2 * i * k))))
        ws = [torch.randn(2 * i, k, generator=g, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
        b = torch.randn(2 * i, generator=g, device="cuda", dtype=torch.bfloat16) * 0.1
        ref = geglu_plain(F.linear(x.double(), ws[0].double(), b.double()))
        scale = ref.abs().max().item()
        unfused = torch.compile(lambda x, w, b: geglu_plain(F.linear(x, w, b)), dynamic=False)
        row = {"tokens": m, "k": k, "i": i, "calls": calls}
        with torch.no_grad():
            row["inductor_err"] = (unfused(x, ws[0], b).double() - ref).abs().max().item() / scale
            row["inductor_us"] = 1e3 * timed(lambda j: unfused(x, ws[j % copies], b), args.iters)
            sweep = []
            for (kind, fn), t in ((kf, t) for kf in (("pointers", geglu_linear), ("tma", geglu_linear_tma))
                                  for t in SWEEP):  # fmt: skip
                try:
                    err = (fn(x, ws[0], b, t).double() - ref).abs().max().item() / scale
                    us = 1e3 * timed(lambda j, t=t, fn=fn: fn(x, ws[j % copies], b, t), args.iters)
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: record, go on
                    sweep.append({**t._asdict(), "loads": kind, "error": f"{type(e).__name__}: {str(e)[:160]}"})
                    continue
                sweep.append({**t._asdict(), "loads": kind, "us": us, "err": err})
        ok = [s for s in sweep if "us" in s]
        row["sweep"] = sweep
        for kind in ("pointers", "tma"):
            mine = [s for s in ok if s["loads"] == kind]
            row[f"best_{kind}"] = min(mine, key=lambda s: s["us"]) if mine else None
        row["best"] = min(ok, key=lambda s: s["us"]) if ok else None
        row["default"] = next((s for s in ok if tuple(s[f] for f in Tiles._fields) == tuple(Tiles(128, 128, 64, 8, 8, 3))), None)
        rows.append(row)
        errs = sorted({s["error"][:100] for s in sweep if "error" in s})
        if errs:
            print("   errors:", errs[:3])
        tot["inductor_us"] += calls * row["inductor_us"]
        tot["best_us"] += calls * min(row["inductor_us"], row["best"]["us"] if row["best"] else 1e9)
        flop = 2 * m * k * 2 * i
        bst = row["best"]
        print(f"{m:5d} x {k:4d} -> 2 x {i:4d} (x{calls}): Inductor {row['inductor_us']:6.1f} us (err {row['inductor_err']:.1e})"
              + (f" | fused best {bst['us']:6.1f} us {bst['loads']} {tuple(bst[f] for f in Tiles._fields)} "
                 f"({flop / bst['us'] / 1e6:.0f} TFLOP/s, err {bst['err']:.1e})" if bst else " | fused: no config ran"),
              flush=True)  # fmt: skip
        print("   best per loads:", {kd: row[f"best_{kd}"] and round(row[f"best_{kd}"]["us"], 1) for kd in ("pointers", "tma")})
    print("per U-Net call (us):", {k_: round(v, 1) for k_, v in tot.items()})
    Path(args.out).write_text(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(),
                                          "rows": rows, "totals": tot}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
