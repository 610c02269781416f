"""Every convolution of one SD1.5 U-Net call, timed alone on the GPU several ways: cuDNN as the heuristics pick it
(what the compiled U-Net runs), cuDNN with ``cudnn.benchmark`` (PyTorch's default ``benchmark_limit``: the
heuristics' first 10 engine configurations timed) and with ``benchmark_limit=0`` (every configuration), each in a
thread of its own (PyTorch's cuDNN plan cache is per thread and ignores the benchmark flag: before the eleventh
session this script timed the benchmark column in the thread that had cached the heuristics' plans, so that
column repeated the heuristics' kernels), and Inductor's max-autotune
(its Triton implicit-GEMM template against ATen); 1x1 convolutions also as a cuBLAS GEMM, 3x3 ones also as
im2col + one cuBLAS GEMM (``conv_as_gemm``: the nine shifted copies side by side). It answers whether any convolution has a faster kernel than the
one the CFG step uses (the 3x3 convolutions are ~40% of it), before anything is built on that.

    python bench/conv_shapes.py --batch 2 --out $OUT/conv_shapes.json

bf16, channels-last, random values; each shape's calls captured in a CUDA graph (20 in a row), CUDA events, median of --iters replays. "x calls" is how often the
U-Net runs that shape per call; the totals weight each shape by it.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.perf_measure import in_fresh_thread  # noqa: E402
from ldm.conditioning import Cond  # noqa: E402
from ldm.unet import UNet, UNetConfig  # noqa: E402


def conv_as_gemm(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int = 1) -> Tensor:
    """F.conv2d(x, weight, bias, stride, padding=1) for a 3x3 weight, as im2col + one GEMM.

    x: (B, C_in, H, W); weight: (C_out, C_in, 3, 3). Returns (B, C_out, H', W'), stored channels-last."""
    B, C, H, W = x.shape
    O = weight.shape[0]
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # (B, H + 2, W + 2, C_in)
    hi, wi = stride * (Ho - 1) + 1, stride * (Wo - 1) + 1
    cols = torch.cat([xp[:, i : i + hi : stride, j : j + wi : stride] for i in range(3) for j in range(3)], dim=-1)
    # cols: (B, H', W', 9 C_in), ordered (kh, kw, c_in)
    w = weight.permute(0, 2, 3, 1).reshape(O, 9 * C)  # (C_out, 9 C_in): a view of a channels-last weight
    out = F.linear(cols.reshape(B * Ho * Wo, 9 * C), w, bias)  # (B H' W', C_out)
    return out.view(B, Ho, Wo, O).permute(0, 3, 1, 2)  # (B, C_out, H', W')


def conv_shapes(batch: int, side: int) -> Counter:
    """(input shape, weight shape, stride, padding) -> calls per U-Net call, from forward hooks."""
    cfg = UNetConfig.sd15()
    with torch.device("meta"):
        unet = UNet(cfg)
    seen: Counter = Counter()

    def hook(mod, inputs, _out):
        seen[(tuple(inputs[0].shape), tuple(mod.weight.shape), mod.stride, mod.padding)] += 1

    for m in unet.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(hook)
    x = torch.empty(batch, 4, side, side, device="meta")
    cond = Cond(context=torch.empty(batch, 77, cfg.context_dim, device="meta"))
    with torch.no_grad():
        unet(x, torch.full((batch,), 500.0, device="meta"), cond)
    return seen


def timed(fn, iters: int, reps: int = 20) -> float:
    """Median ms of one call: ``reps`` calls captured in a CUDA graph, replayed ``iters`` times between CUDA events
    (without the graph, a 20-50 us launch from Python hides the kernel)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out = []
    for _ in range(iters):
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        out.append(s.elapsed_time(e) / reps)
    return sorted(out)[len(out) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--side", type=int, default=64, help="latent side (default: %(default)s)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--no-autotune", action="store_true", help="skip the max-autotune column (it compiles per shape)")
    ap.add_argument("--out", default="conv_shapes.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    import torch._inductor.config as inductor_config

    inductor_config.max_autotune_conv_backends = "ATEN,TRITON"
    inductor_config.max_autotune_gemm_backends = "ATEN"
    torch._dynamo.config.cache_size_limit = 256
    rows = []
    for (xs, ws, stride, padding), calls in sorted(conv_shapes(args.batch, args.side).items(), key=lambda kv: kv[0]):
        g = torch.Generator("cuda").manual_seed(0)
        x = torch.randn(xs, generator=g, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        w = (torch.randn(ws, generator=g, device="cuda", dtype=torch.bfloat16) * 0.02).to(
            memory_format=torch.channels_last)
        b = torch.randn(ws[0], generator=g, device="cuda", dtype=torch.bfloat16)

        def conv(x=x, w=w, b=b, stride=stride, padding=padding):
            return F.conv2d(x, w, b, stride, padding)

        with torch.no_grad():
            ref = conv()
            heur = in_fresh_thread(timed, conv, args.iters, cudnn={"benchmark": False})
            bench = in_fresh_thread(timed, conv, args.iters, cudnn={"benchmark": True, "benchmark_limit": 10})
            bench_all = in_fresh_thread(timed, conv, args.iters, cudnn={"benchmark": True, "benchmark_limit": 0})
            linear = None
            if ws[2:] == (1, 1) and stride == (1, 1):  # a 1x1 convolution is a GEMM on the (B*H*W, C) view
                w2 = w.reshape(ws[0], ws[1])

                def as_mm(x=x, w2=w2, b=b):
                    return F.linear(x.permute(0, 2, 3, 1), w2, b).permute(0, 3, 1, 2)

                torch.testing.assert_close(as_mm(), ref, atol=2e-2, rtol=2e-2)  # bf16 sums in two orders
                linear = timed(as_mm, args.iters)
            im2col = None
            if ws[2:] == (3, 3) and padding == (1, 1):  # the 9 shifted copies side by side, then one GEMM

                def as_im2col(x=x, w=w, b=b, stride=stride):
                    return conv_as_gemm(x, w, b, stride[0])

                torch.testing.assert_close(as_im2col(), ref, atol=2e-2, rtol=2e-2)  # bf16 sums in two orders
                im2col = timed(as_im2col, args.iters)
            tuned, err = None, None
            if not args.no_autotune:
                torch._dynamo.reset()
                f = torch.compile(lambda x, w, b, s=stride, p=padding: F.conv2d(x, w, b, s, p),
                                  mode="max-autotune-no-cudagraphs", dynamic=False)
                err = (f(x, w, b).float() - ref.float()).abs().max().item()
                tuned = timed(lambda: f(x, w, b), args.iters)
        ho, wo = ref.shape[2], ref.shape[3]
        flop = 2 * xs[0] * ho * wo * ws[0] * ws[1] * ws[2] * ws[3]
        rows.append({"input": xs, "weight": ws, "stride": stride, "calls": calls, "gflop": flop / 1e9,
                     "cudnn_ms": heur, "cudnn_benchmark_ms": bench, "cudnn_benchmark_all_ms": bench_all,
                     "linear_ms": linear, "im2col_ms": im2col, "autotune_ms": tuned, "autotune_err": err,
                     "cudnn_tflops": flop / heur / 1e9})
        r = rows[-1]
        line = (f"x{calls:2d} in {xs} w {ws} s{stride[0]}: cuDNN {heur * 1e3:7.1f} us ({r['cudnn_tflops']:4.0f} "
                f"TFLOP/s)  benchmark {bench * 1e3:7.1f} us  benchmark all {bench_all * 1e3:7.1f} us")
        if linear:
            line += f"  as GEMM {linear * 1e3:7.1f} us"
        if im2col:
            line += f"  im2col + GEMM {im2col * 1e3:7.1f} us"
        if tuned is not None:
            line += f"  max-autotune {tuned * 1e3:7.1f} us (err {err:.1e})"
        print(line, flush=True)
    tot = {k: sum(r[k] * r["calls"] for r in rows)
           for k in ("cudnn_ms", "cudnn_benchmark_ms", "cudnn_benchmark_all_ms")}
    tot["one_by_one_cudnn_ms"] = sum(r["cudnn_ms"] * r["calls"] for r in rows if r["linear_ms"])
    tot["one_by_one_gemm_ms"] = sum(r["linear_ms"] * r["calls"] for r in rows if r["linear_ms"])
    tot["best_3x3_cudnn_or_im2col_ms"] = sum(min(r["cudnn_ms"], r["im2col_ms"] or 1e9) * r["calls"] for r in rows)
    if not args.no_autotune:
        tot["autotune_ms"] = sum(r["autotune_ms"] * r["calls"] for r in rows)
        columns = ("cudnn_ms", "cudnn_benchmark_ms", "cudnn_benchmark_all_ms", "linear_ms", "im2col_ms", "autotune_ms")
        tot["best_ms"] = sum(min(r[c] for c in columns if r[c] is not None) * r["calls"] for r in rows)
    print("per U-Net call (ms):", {k: round(v, 3) for k, v in tot.items()})
    Path(args.out).write_text(json.dumps({"batch": args.batch, "side": args.side, "torch": torch.__version__,
                                          "cudnn": torch.backends.cudnn.version(),
                                          "device": torch.cuda.get_device_name(), "rows": rows, "totals": tot},
                                         indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
