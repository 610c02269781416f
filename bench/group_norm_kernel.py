"""GroupNorm + SiLU of channels-last activations at the SD 1.5 U-Net's shapes (batch 2): ldm's two Triton kernels
(ldm/group_norm_triton.py) against PyTorch's eager GroupNorm and Inductor's compiled one, each alone in a CUDA graph.

    python bench/group_norm_kernel.py --out $OUT/group_norm_kernel.json

bf16, random values with per-channel offsets. Each timing: a CUDA graph of 20 calls replayed --iters times, the
median per call. err: max |out - fp64| / max |fp64| (bf16 rounding is ~4e-3).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.conv_shapes import timed  # noqa: E402 (a CUDA graph of 20 calls, replayed; median ms per call)
from ldm.group_norm_triton import group_norm_silu_triton  # noqa: E402

SHAPES = [(320, 64), (640, 64), (960, 64), (640, 32), (1280, 32), (1920, 32), (1280, 16), (2560, 16), (1280, 8),
          (2560, 8)]  # (channels, side) of the norms in one SD 1.5 call  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out", default="group_norm_kernel.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")

    def plain(x, w, b, silu):
        y = F.group_norm(x, 32, w, b, 1e-5)
        return F.silu(y) if silu else y

    torch._dynamo.config.cache_size_limit = 64  # one graph per shape
    compiled = torch.compile(plain, dynamic=False)
    rows = []
    for c, side in SHAPES:
        g = torch.Generator("cuda").manual_seed(c + side)
        x = (torch.randn(args.batch, c, side, side, device="cuda", generator=g)
             + torch.linspace(-2, 4, c, device="cuda").view(1, c, 1, 1))  # fmt: skip
        x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        w = torch.randn(c, device="cuda", generator=g).to(torch.bfloat16)
        b = torch.randn(c, device="cuda", generator=g).to(torch.bfloat16)
        for silu in (True,) if c != 320 else (True, False):  # the plain norm (a transformer's) at one shape
            ref = plain(x.double(), w.double(), b.double(), silu)

            def err(y):
                return ((y.double() - ref).abs().max() / ref.abs().max()).item()

            row = {"channels": c, "side": side, "silu": silu, "mb": x.numel() * 2 / 1e6}
            with torch.no_grad():
                for name, fn in (("eager", lambda: plain(x, w, b, silu)), ("inductor", lambda: compiled(x, w, b, silu)),
                                 ("ldm", lambda: group_norm_silu_triton(x, 32, w, b, 1e-5, silu))):  # fmt: skip
                    row[f"{name}_err"] = err(fn())
                    row[f"{name}_us"] = 1e3 * timed(fn, args.iters)
            rows.append(row)
            print(f"C={c:5d} {side:3d}x{side:<3d} silu={silu!s:5}  {row['mb']:5.1f} MB  eager {row['eager_us']:6.1f} us"
                  f"  inductor {row['inductor_us']:6.1f} us  ldm {row['ldm_us']:6.1f} us   err {row['ldm_err']:.1e} "
                  f"(inductor {row['inductor_err']:.1e})", flush=True)
    meta = {"batch": args.batch, "torch": torch.__version__, "device": torch.cuda.get_device_name()}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
