"""An SD 1.5 ControlNet's call in the CFG step (batch 2, 64x64 latent, 512x512 hint): diffusers' ControlNetModel
eager against ours eager, with the default speed switches (cuDNN-first attention, fused q/k/v, CUDA graphs) and
compiled; the same random weights (diffusers' state dict through our key map).

    python bench/controlnet_speed.py --out $OUT/controlnet_speed.json

bf16, CUDA events: the median of --reps single calls ("ms") and of 10 back-to-back calls ("b2b"). err: the largest
over the 13 residuals of max |out - ours fp32 eager| / max |ours fp32 eager|; ok if < --tol (bf16 rounding).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.perf_measure import back_to_back_ms, median_ms, randomize_  # noqa: E402
from ldm.conditioning import Cond  # noqa: E402
from ldm.controlnet import ControlNet, ControlNetConfig  # noqa: E402
from ldm.controlnet_keys import diffusers_to_ours  # noqa: E402
from ldm.speed import SpeedConfig, apply_speed  # noqa: E402
from ldm.unet import UNetConfig  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--tol", type=float, default=3e-2)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled variant (~40 s to compile)")
    ap.add_argument("--out", default="controlnet_speed.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    from diffusers import ControlNetModel

    from ldm.components import unet_config_to_diffusers

    plan = SimpleNamespace(device="cuda", reps=args.reps, warmup=5)  # what median_ms / back_to_back_ms read
    ucfg = UNetConfig.sd15()
    dcfg = {k: v for k, v in unet_config_to_diffusers(ucfg).items()
            if not k.startswith("_") and k not in ("up_block_types", "out_channels", "dropout")}  # fmt: skip
    cfg = ControlNetConfig.from_unet(ucfg)
    with torch.device("cuda"):
        ref = ControlNetModel(**dcfg, conditioning_channels=3).eval()
        randomize_(ref, seed=1)
        ours = ControlNet(cfg).eval()
    ours.load_state_dict(diffusers_to_ours(ref.state_dict(), cfg), strict=True)
    g = torch.Generator("cuda").manual_seed(2)
    x = torch.randn(2, 4, 64, 64, generator=g, device="cuda")
    hint = torch.rand(2, 3, 512, 512, generator=g, device="cuda")
    t = torch.tensor([501.0, 501.0], device="cuda")
    ctx = torch.randn(2, 77, ucfg.context_dim, generator=g, device="cuda")
    with torch.no_grad():
        want = ours(x, hint, t, Cond(context=ctx))  # fp32 eager: every row's reference
        down, mid = ref(x, t, encoder_hidden_states=ctx, controlnet_cond=hint, return_dict=False)
    parity = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip((*down, mid), want))
    rows = [{"variant": "parity: fp32 ours vs diffusers", "err": parity}]
    print(json.dumps(rows[-1]), flush=True)
    ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    xb, hb, cb = x.bfloat16(), hint.bfloat16(), ctx.bfloat16()

    def err(out) -> float:
        return max(float((a.float() - b).abs().max() / b.abs().max()) for a, b in zip(out, want))

    def record(impl: str, variant: str, fn, **extra) -> dict:
        with torch.no_grad():
            out = fn()
            ms, b2b = median_ms(fn, plan), back_to_back_ms(fn, plan)
        row = {"impl": impl, "variant": variant, "ms": ms, "ms_b2b": b2b, "err": err(out), **extra}
        row["ok"] = row["err"] < args.tol
        if rows[1:]:
            row["vs_diffusers"], row["vs_diffusers_b2b"] = ms / rows[1]["ms"], b2b / rows[1]["ms_b2b"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    def ref_call():
        down, mid = ref(xb, t, encoder_hidden_states=cb, controlnet_cond=hb, return_dict=False)
        return (*down, mid)

    record("diffusers", "eager", ref_call)
    record("ours", "eager (speed off)", lambda: ours(xb, hb, t, Cond(context=cb)))
    variants = {"default speed (SpeedConfig(): fastest attention, fused q/k/v, CUDA graphs)": SpeedConfig()}
    if not args.no_compile:
        variants["compile default (+ channels-last, CUDA graphs)"] = SpeedConfig(compile="default")
    for label, speed in variants.items():
        t0 = time.perf_counter()
        applied = apply_speed(ours, speed)
        with torch.no_grad():
            ours(xb, hb, t, Cond(context=cb))
        torch.cuda.synchronize()
        record("ours", label, lambda: ours(xb, hb, t, Cond(context=cb)), first_call_s=time.perf_counter() - t0,
               speed=applied.describe(), graphs=len(getattr(ours.forward, "graphs", {})))  # fmt: skip
    lines = ["| impl | variant | ms (b2b) | vs diffusers eager (b2b) | err vs our fp32 | ok |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows[1:]:
        ratio = f"{r['vs_diffusers']:.2f}x ({r['vs_diffusers_b2b']:.2f}x)" if "vs_diffusers" in r else ""
        lines.append(f"| {r['impl']} | {r['variant']} | {r['ms']:.2f} ({r['ms_b2b']:.2f}) | {ratio} | {r['err']:.1e} | "
                     f"{'yes' if r['ok'] else 'NO'} |")  # fmt: skip
    print("\n".join(lines))
    Path(args.out).write_text(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(),
                                          "rows": rows}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
