"""Side-by-side timing of U-Net variants in one process: each variant compiled (compile=default + channels-last)
and captured in a CUDA graph, then the graphs replayed in turns (A B C A B C ...), so clock and thermal drift hit
every variant alike. It resolves differences of ~0.02 ms that separate profile runs (separate processes, ~0.05 ms
apart on the same machine) cannot.

    python bench/ab_unet.py --out $OUT/ab.json \\
        --variant "base:" --variant "plain cat:cat=plain" --variant "1x1 as mm:inductor.conv_1x1_as_mm=true"

A variant is ``NAME:KEY=VALUE,KEY=VALUE``; keys are SpeedConfig fields (JSON values: true, false, "fa4"),
``cat=plain`` (the up path's skip concatenation as plain torch.cat instead of ldm's channels-last one) or
``inductor.KEY`` (torch._inductor.config, set for that variant's compilation only) or ``ldm.MODULE.NAME`` (a
constant of an ldm module, e.g. ``ldm.group_norm_triton._MAX_ROW_PROGRAMS=64``, likewise set while the variant
compiles) or ``cudnn.benchmark`` / ``cudnn.benchmark_limit`` (torch.backends.cudnn, set while the variant compiles,
warms up and is captured; ``benchmark_limit=0`` times every cuDNN engine) or ``cfg=true`` (the batch as classifier-free guidance's one latent under two texts: x, t of batch / 2
rows, the texts of batch rows). The
inputs are a CFG batch for every variant (the second half's latents and times are the first half's). Each variant's output is
compared with the first one's (bf16, the same weights and inputs). A variant with ``cudnn.`` keys is built in a
thread of its own (``bench.perf_measure.in_fresh_thread``): PyTorch caches its cuDNN convolution plans per thread,
whatever ``cudnn.benchmark`` says, so built here it would reuse the heuristics' plans of the variants before it.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ldm.unet  # noqa: E402
from bench.inductor_flags import set_config  # noqa: E402
from bench.perf_measure import in_fresh_thread, randomize_  # noqa: E402
from ldm.conditioning import Cond  # noqa: E402
from ldm.speed import CUDAGraphForward, SpeedConfig, apply_speed  # noqa: E402
from ldm.unet import UNet, UNetConfig  # noqa: E402

DEFAULT_VARIANTS = ["default:", "plain cat:cat=plain"]


CUDNN_KEYS = ("benchmark", "benchmark_limit")


def parse_variant(ap: argparse.ArgumentParser, text: str) -> tuple[str, dict, dict, str]:
    """'NAME:k=v,...' -> (name, SpeedConfig overrides, inductor config (+ "cfg", "cudnn"), cat mode); errors name
    the variant."""
    name, sep, rest = text.partition(":")
    if not sep or not name:
        ap.error(f"--variant {text!r}: expected NAME:KEY=VALUE,...")
    speed, inductor, cat = {}, {"cfg": False, "cudnn": {}}, "nhwc"
    fields = set(SpeedConfig.__dataclass_fields__)
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            ap.error(f"--variant {name!r}: {item!r} is not KEY=VALUE")
        if key == "cat":
            if value not in ("plain", "nhwc"):
                ap.error(f"--variant {name!r}: cat must be plain or nhwc, got {value!r}")
            cat = value
            continue
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            ap.error(f"--variant {name!r}: {key}'s value must be JSON (true, 3, \"fa4\"), got {value!r}")
        if key == "cfg":
            inductor["cfg"] = bool(parsed)
        elif key.startswith("cudnn."):
            if key.removeprefix("cudnn.") not in CUDNN_KEYS:
                keys = ", ".join("cudnn." + k for k in CUDNN_KEYS)
                ap.error(f"--variant {name!r}: {key!r}: the cuDNN keys are {keys}")
            inductor["cudnn"][key.removeprefix("cudnn.")] = parsed
        elif key.startswith(("inductor.", "ldm.")):
            inductor[key.removeprefix("inductor.")] = parsed
        elif key in fields:
            speed[key] = parsed
        else:
            ap.error(f"--variant {name!r}: {key!r} is neither a SpeedConfig field, cat, cfg, inductor.KEY, cudnn.KEY "
                     "nor ldm.MODULE.NAME")
    return name, speed, inductor, cat


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", default=[], help="NAME:KEY=VALUE,... (repeatable; the first is the "
                    f"baseline; default: {DEFAULT_VARIANTS})")  # fmt: skip
    ap.add_argument("--model", choices=("sd15", "sdxl"), default="sd15")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--side", type=int, default=64, help="latent side (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=30, help="turns per variant (default: %(default)s)")
    ap.add_argument("--calls", type=int, default=10, help="graph replays per turn (default: %(default)s)")
    ap.add_argument("--out", default="ab_unet.json")
    args = ap.parse_args()
    variants = [parse_variant(ap, v) for v in (args.variant or DEFAULT_VARIANTS)]
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    torch._dynamo.config.cache_size_limit = 64
    cfg = UNetConfig.sd15() if args.model == "sd15" else UNetConfig.sdxl_base()
    torch.manual_seed(0)
    with torch.device("cuda"):
        base = randomize_(UNet(cfg), seed=1).to(torch.bfloat16).eval()  # random weights, the zero-init out conv too
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(args.batch, cfg.in_channels, args.side, args.side, generator=g, device="cuda", dtype=torch.bfloat16)
    t = torch.full((args.batch,), 500, device="cuda")
    vec = (torch.randn(args.batch, cfg.adm_in_channels, generator=g, device="cuda", dtype=torch.bfloat16)
           if args.model == "sdxl" else None)
    cond = Cond(context=torch.randn(args.batch, 77, cfg.context_dim, generator=g, device="cuda", dtype=torch.bfloat16),
                vector=vec)
    half = args.batch // 2  # a CFG batch: the first half's latents and times, under both halves' texts
    x[half:], t[half:] = x[:half], t[:half]
    plain_cat = ldm.unet.cat_channels
    graphs, rows, ref = [], [], None
    for name, speed, inductor, cat in variants:
        shared, cudnn = inductor.pop("cfg"), inductor.pop("cudnn")
        call_args = (x[:half], t[:half], Cond(context=cond.context)) if shared else (x, t, cond)

        def build(speed=speed, inductor=inductor, cat=cat, call_args=call_args):
            unet = copy.deepcopy(base)
            applied = apply_speed(unet, SpeedConfig(**{"compile": "default", "channels_last": True, **speed,
                                                       "cuda_graphs": False}))
            ldm.unet.cat_channels = (lambda h, skip: torch.cat([h, skip], dim=1)) if cat == "plain" else plain_cat
            old = set_config(inductor)
            try:
                with torch.no_grad():
                    for _ in range(3):
                        out = unet(*call_args)
                    graphed = CUDAGraphForward(unet.forward)
                    for _ in range(3):
                        out = graphed(*call_args)
            finally:
                set_config(old)
                ldm.unet.cat_channels = plain_cat
            torch.cuda.synchronize()
            return applied, graphed, out.float().clone()

        # a variant with cuDNN flags is built in a thread of its own (its own cuDNN plan cache); the others here
        applied, graphed, out = in_fresh_thread(build, cudnn=cudnn) if cudnn else build()
        ref = out if ref is None else ref
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        graphs.append((graphed, call_args))
        rows.append({"variant": name, "speed": applied.describe(), "inductor": inductor, "cudnn": cudnn, "cat": cat,
                     "cfg": shared, "err_vs_first": err})
        print(f"compiled {name!r}: max |out - first| / max |first| = {err:.1e}", flush=True)
    times = [[] for _ in variants]
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.no_grad():
        for _ in range(args.rounds):
            for i, (graphed, call_args) in enumerate(graphs):
                s.record()
                for _ in range(args.calls):
                    graphed(*call_args)
                e.record()
                e.synchronize()
                times[i].append(s.elapsed_time(e) / args.calls)
    base_ms = None
    for row, ts in zip(rows, times):
        ts = sorted(ts)
        row["ms"], row["ms_p10"], row["ms_p90"] = ts[len(ts) // 2], ts[len(ts) // 10], ts[(9 * len(ts)) // 10]
        base_ms = base_ms or row["ms"]
        row["vs_first"] = row["ms"] / base_ms
        print(f"{row['variant']:40s} {row['ms']:7.3f} ms (p10 {row['ms_p10']:.3f}, p90 {row['ms_p90']:.3f})  "
              f"x{row['vs_first']:.3f} of the first   err {row['err_vs_first']:.1e}")
    meta = {"model": args.model, "batch": args.batch, "side": args.side, "rounds": args.rounds, "calls": args.calls,
            "torch": torch.__version__, "device": torch.cuda.get_device_name()}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
