"""The U-Net's cross-attention (queries = pixels, 77 text keys) per SDPA kernel, each captured in a CUDA graph, for
SD 1.5's three attention levels at batch 2: which kernel a short-key call should get, and whether it memsets.

    python bench/attention_short.py --out $OUT/attention_short.json

bf16, random values; median us per call of 20 calls per graph replay; err = max |out - fp32 math| / max |fp32 math|.
Memsets per call are counted from a profiler trace of one eager call.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.splitk_conv import timed  # noqa: E402
from ldm.attention import math_attention  # noqa: E402

KERNELS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
           "efficient": SDPBackend.EFFICIENT_ATTENTION}  # fmt: skip
SHAPES = ((4096, 40), (1024, 80), (256, 160), (64, 160))  # (query tokens, head dim) of SD 1.5's four levels


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--keys", type=int, default=77)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out", default="attention_short.json")
    args = ap.parse_args()
    rows = []
    for tokens, d in SHAPES:
        g = torch.Generator("cuda").manual_seed(0)
        q = torch.randn(args.batch, 8, tokens, d, generator=g, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(args.batch, 8, args.keys, d, generator=g, device="cuda", dtype=torch.bfloat16)
                for _ in range(2))  # fmt: skip
        ref = math_attention(q.float(), k.float(), v.float())
        scale = ref.abs().max().item()
        for name, kernel in KERNELS.items():
            row = {"tokens": tokens, "keys": args.keys, "head_dim": d, "kernel": name}
            try:
                with torch.no_grad(), sdpa_kernel(kernel):
                    out = F.scaled_dot_product_attention(q, k, v)
                    row["err"] = (out.float() - ref).abs().max().item() / scale
                    row["us"] = 1e3 * timed(lambda i: F.scaled_dot_product_attention(q, k, v), args.iters, reps=20)
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                        F.scaled_dot_product_attention(q, k, v)
                        torch.cuda.synchronize()
                    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
                    row["memsets"] = sum("memset" in n.lower() for n in names)
                    row["kernels"] = sorted(set(names))
            except Exception as e:  # noqa: BLE001 - a kernel that cannot run this shape: record it
                row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
            rows.append(row)
            print(json.dumps({k_: v_ for k_, v_ in row.items() if k_ != "kernels"}), flush=True)
    Path(args.out).write_text(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(),
                                          "batch": args.batch, "rows": rows}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
