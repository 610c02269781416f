"""U-Net and VAE speed, ours vs diffusers, same random weights, same GPU, one process.

CUDA-event timing, median of N after warm-up; FLOPs counted once with torch.utils.flop_counter; MFU against the
measured bf16 matmul peak given by --peak (790 TFLOP/s on the H200 per the performance issue).

    python bench/speed.py --out $OUT/speed.json [--compile]
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
from torch.utils.flop_counter import FlopCounterMode

from ldm.conditioning import Cond
from ldm.unet import UNet
from ldm.unet_keys import diffusers_to_ours
from tests.test_unet_params import PUBLISHED


def cuda_time(fn, warmup=5, reps=30) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def unet_pair(name: str, dtype):
    from diffusers import UNet2DConditionModel

    _, make_cfg, dcfg = PUBLISHED[name]
    cfg = make_cfg()
    ref = UNet2DConditionModel(**dcfg).eval()
    ours = UNet(cfg).eval()
    ours.load_state_dict(diffusers_to_ours(ref.state_dict(), cfg), strict=True)
    return cfg, ref.to("cuda", dtype), ours.to("cuda", dtype)


def bench_unet(name, batch, hw, dtype, peak, kernels, do_compile, rows):
    cfg, ref, ours = unet_pair(name, dtype)
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(batch, 4, hw, hw, generator=g, device="cuda", dtype=dtype)
    t = torch.full((batch,), 500.0, device="cuda")
    ctx = torch.randn(batch, 77, cfg.context_dim, generator=g, device="cuda", dtype=dtype)
    kw, vec = {}, None
    if cfg.adm_in_channels:
        te = torch.randn(batch, 1280, generator=g, device="cuda", dtype=dtype)
        ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * batch, device="cuda")
        kw["added_cond_kwargs"] = {"text_embeds": te, "time_ids": ids.to(dtype)}
        with torch.no_grad():
            vec = torch.cat([te, ref.add_time_proj(ids.flatten()).reshape(batch, -1).to(dtype)], -1)
    cond = Cond(context=ctx, vector=vec)
    with torch.no_grad():
        f_ref = lambda: ref(x, t, encoder_hidden_states=ctx, **kw).sample  # noqa: E731
        n_flops = flops(f_ref)
        t_ref = cuda_time(f_ref)
        row = {"case": f"{name} b{batch} {hw}x{hw} {str(dtype)[6:]}", "flops": n_flops, "diffusers_ms": t_ref}
        for k in kernels:
            ours.set_attention_backend("sdpa", k)
            row[f"ours_{k}_ms"] = cuda_time(lambda: ours(x, t, cond))
        best = min(v for key, v in row.items() if key.startswith("ours_"))
        row["ratio_best_vs_diffusers"] = best / t_ref
        row["ours_best_tflops"] = n_flops / best / 1e9
        row["ours_best_mfu"] = n_flops / best / 1e9 / peak
        row["diffusers_tflops"] = n_flops / t_ref / 1e9
        if do_compile:
            ours.set_attention_backend("sdpa", "auto")
            c = torch.compile(ours)
            row["ours_compiled_ms"] = cuda_time(lambda: c(x, t, cond), warmup=3)
    rows.append(row)
    print(json.dumps(row), flush=True)
    del ref, ours
    torch.cuda.empty_cache()


def bench_vae(dtype, rows):
    from diffusers import AutoencoderKL as RefVAE

    from autoencoder import AutoencoderConfig, AutoencoderKL
    from autoencoder.keys import config_to_diffusers, diffusers_to_ours as d2o

    cfg = AutoencoderConfig.sd()
    ref = RefVAE(**config_to_diffusers(cfg)).eval()
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(d2o(ref.state_dict(), cfg), strict=True)
    ref, ours = ref.to("cuda", dtype), ours.to("cuda", dtype)
    z = torch.randn(1, 4, 64, 64, device="cuda", dtype=dtype)
    with torch.no_grad():
        row = {"case": f"vae decode 512 b1 {str(dtype)[6:]}",
               "diffusers_ms": cuda_time(lambda: ref.decode(z / cfg.scale_factor).sample),
               "ours_ms": cuda_time(lambda: ours.decode(z))}
    row["ratio"] = row["ours_ms"] / row["diffusers_ms"]
    rows.append(row)
    print(json.dumps(row), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="speed.json")
    ap.add_argument("--peak", type=float, default=790.0, help="bf16 matmul peak in TFLOP/s for MFU")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(ours) (default mode)")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = [{"device": torch.cuda.get_device_name(), "torch": torch.__version__}]
    kernels = ["auto", "cudnn", "flash"]
    bench_unet("sd15", 2, 64, torch.bfloat16, args.peak, kernels, args.compile, rows)
    bench_unet("sd15", 16, 64, torch.bfloat16, args.peak, kernels, False, rows)
    bench_unet("sdxl_base", 2, 128, torch.bfloat16, args.peak, kernels, False, rows)
    bench_vae(torch.bfloat16, rows)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
