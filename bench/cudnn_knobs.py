"""Every cuDNN engine and knob setting (kernel configuration, tile sizes, cluster shape, split-K, ...) for a
U-Net's convolutions at the SD 1.5 CFG batch, timed alone: does cuDNN have a kernel that its heuristics (what
PyTorch and the compiled U-Net run) and ``cudnn.benchmark`` (which times only the configurations the heuristics
list) never pick? By default the four 64x64-level 3x3 shapes; ``--all-shapes`` every convolution of the call
(bench/conv_shapes.py). ``--write-plans FILE`` writes the winners for ``speed.conv_plans`` (ldm/conv_plans.py);
``--from-results`` merges earlier runs' JSON into one without a GPU. Needs the ``nvidia-cudnn-frontend`` Python
package (1.16: no dependencies).

    python bench/cudnn_knobs.py --out $OUT/cudnn_knobs.json
    python bench/cudnn_knobs.py --all-shapes --engines 72 --shape-range 0:6 --budget 80 --write-plans $OUT/plans.json

Per shape: the operation graph that ``speed.conv_plans`` builds (``ldm.conv_plans.conv_graph``: bf16 NHWC in and
out, fp32 accumulation) gets one execution plan per (engine, knob setting): every value of the kernel and tiling
knobs, the first four of the long split-K ranges, up to ``--max-per-engine`` settings per engine (a seeded sample
beyond that), in a random order, inside ``--budget`` seconds. Each plan that builds is checked against ``F.conv2d``
(bf16: max |diff| / max |ref|) and timed with CUDA events over 20 back-to-back calls queued behind a
``torch.cuda._sleep`` (so the Python launch cost is hidden), median of ``--iters``; ``F.conv2d`` (cuDNN's
heuristics) is timed the same way.
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.conv_plans import conv_graph, write_plans  # noqa: E402

# (input shape, weight shape, calls per U-Net call): the 64x64 level of the SD 1.5 U-Net at batch 2 (stride 1).
SHAPES = [
    ((2, 320, 64, 64), (320, 320, 3, 3), 7),
    ((2, 640, 64, 64), (320, 640, 3, 3), 2),
    ((2, 960, 64, 64), (320, 960, 3, 3), 1),
    ((2, 640, 64, 64), (640, 640, 3, 3), 1),
]


# Knobs whose every value is tried (the kernel choice and its tiling); the others' long ranges (split-K slice and
# buffer counts up to thousands) only their first four values.
FULL_RANGE = ("KERNEL_CFG", "TILE", "STAGES", "CGA")


def time_calls(fn, iters: int, reps: int = 20) -> float:
    """Median us of one call: ``reps`` calls queued behind a GPU sleep, between CUDA events."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out = []
    for _ in range(iters):
        torch.cuda._sleep(2_000_000)  # ~1 ms: the host queues every call before the first runs
        s.record()
        for _ in range(reps):
            fn()
        e.record()
        e.synchronize()
        out.append(s.elapsed_time(e) * 1000 / reps)
    return sorted(out)[len(out) // 2]


def knob_fields(knob) -> tuple:
    """(type, min, max, stride) of a frontend knob object, whatever the binding calls them."""
    def get(*names):
        for n in names:
            if hasattr(knob, n):
                return getattr(knob, n)
        raise AttributeError(f"knob has none of {names}: {dir(knob)}")

    return get("type", "knob_type"), get("min_value", "minValue"), get("max_value", "maxValue"), get("stride")


def sweep_shape(handle, xs, ws, iters: int, max_per_engine: int, budget: float, seed: int,
                stride: int = 1, engines_only: set | None = None) -> dict:
    fan_in = ws[1] * ws[2] * ws[3]
    x = torch.randn(xs, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(ws, device="cuda", dtype=torch.bfloat16) / fan_in**0.5).contiguous(
        memory_format=torch.channels_last)
    pad = ws[-1] // 2
    ref = F.conv2d(x, w, stride=stride, padding=pad)
    y = torch.empty_like(ref)
    torch_us = time_calls(lambda: F.conv2d(x, w, stride=stride, padding=pad), iters)

    g, X, W, Y = conv_graph(handle, x, w, y, stride, pad)  # what speed.conv_plans builds
    engines = g.get_engine_count()

    rng = random.Random(seed)
    configs, knob_info = [], {}
    for eng in range(engines):
        if engines_only is not None and eng not in engines_only:
            continue
        try:
            knobs = g.get_knobs_for_engine(eng)
        except Exception as err:  # noqa: BLE001 - an engine that does not apply to this graph
            knob_info[eng] = f"no knobs: {type(err).__name__}: {str(err)[:120]}"
            continue
        axes = []
        for k in knobs:
            kt, lo, hi, st = knob_fields(k)
            vals = list(range(int(lo), int(hi) + 1, max(int(st), 1)))
            if len(vals) > 16 and not any(t in str(kt) for t in FULL_RANGE):
                vals = vals[:4]  # split-K slices / buffers: the small values; thousands of them never build
            axes.append((kt, vals))
        knob_info[eng] = {str(kt): [v[0], v[-1], len(v)] for kt, v in axes}
        total = 1
        for _, vals in axes:
            total *= len(vals)
        if total <= max_per_engine:
            combos = list(itertools.product(*[vals for _, vals in axes]))
        else:
            combos = {tuple(rng.choice(vals) for _, vals in axes) for _ in range(max_per_engine)}
            combos = sorted(combos)
        configs += [(eng, {kt: v for (kt, _), v in zip(axes, combo)}) for combo in combos]
    rng.shuffle(configs)  # the budget cuts a fair sample of every engine, not the last engines

    ws_buf = torch.empty(0, device="cuda", dtype=torch.uint8)
    results, errors, created, failed = [], [], 0, 0
    t0 = time.time()
    for eng, knobs in configs:
        if time.time() - t0 > budget:
            break
        try:
            g.create_execution_plan(eng, knobs)
            idx = g.get_execution_plan_count() - 1
            created += 1
            g.build_plan_at_index(idx)
            need = g.get_workspace_size_plan_at_index(idx)
            if need > ws_buf.numel():
                ws_buf = torch.empty(need, device="cuda", dtype=torch.uint8)
            pack = {X: x, W: w, Y: y}
            y.zero_()
            g.execute_plan_at_index(pack, ws_buf, idx, handle)
            torch.cuda.synchronize()
            err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            us = time_calls(lambda: g.execute_plan_at_index(pack, ws_buf, idx, handle), iters)
        except Exception as exc:  # noqa: BLE001 - a knob setting the engine rejects
            failed += 1
            if len(errors) < 5:
                errors.append(f"engine {eng} {knobs}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        results.append({"engine": eng, "knobs": {str(k): v for k, v in knobs.items()}, "us": us, "err": err,
                        "workspace": need})
    results.sort(key=lambda r: r["us"])
    flops = 2 * ref.numel() * fan_in
    return {"input": xs, "weight": ws, "stride": stride, "padding": pad, "torch_us": torch_us,
            "torch_tflops": flops / torch_us / 1e6,
            "engines": engines, "knobs": {str(k): v for k, v in knob_info.items()}, "configs": len(configs),
            "tried": created, "failed": failed, "timed": len(results), "seconds": time.time() - t0,
            "best": results[:15], "errors": errors}


MAX_ERR = 1e-2  # max |plan - F.conv2d| / max |F.conv2d| for a plan to be written


def winners(shapes: list[dict], min_gain: float) -> list[dict]:
    """Each shape's fastest plan, where it beats F.conv2d by ``min_gain``, as plans-file entries."""
    out = []
    for r in shapes:
        # a plan whose output strays from F.conv2d's by more than bf16 rounding (~4e-3 of the largest value) is wrong
        right = [b for b in r["best"] if b["err"] <= MAX_ERR]
        if not right or right[0]["us"] > (1 - min_gain) * r["torch_us"]:
            continue
        b = right[0]
        out.append({"input": r["input"], "weight": r["weight"], "stride": r["stride"], "padding": r["padding"],
                    "dtype": "bfloat16", "engine": b["engine"],
                    "knobs": {k.removeprefix("knob_type."): v for k, v in b["knobs"].items()},
                    "us": round(b["us"], 2), "conv2d_us": round(r["torch_us"], 2)})
    return out


def merge(ap: argparse.ArgumentParser, files: list[str], out: str, min_gain: float) -> int:
    """Each shape's fastest plan over several runs (one GPU, one cuDNN), written as a plans file."""
    best: dict[tuple, dict] = {}
    gpu = None
    for f in files:
        try:
            report = json.loads(Path(f).read_text())
        except (OSError, json.JSONDecodeError) as err:
            ap.error(f"--from-results {f}: {err}")
        if gpu not in (None, (report["gpu"], report["cudnn"])):
            ap.error(f"--from-results {f}: measured on {report['gpu']} / cuDNN {report['cudnn']}, not {gpu}")
        gpu = (report["gpu"], report["cudnn"])
        for r in report["shapes"]:
            key = (tuple(r["input"]), tuple(r["weight"]), r["stride"], r["padding"])
            old = best.get(key)
            if old is None or (r["best"] and (not old["best"] or r["best"][0]["us"] < old["best"][0]["us"])):
                best[key] = r  # with its own run's F.conv2d time: the gain is measured within one run
    n = write_plans(out, gpu[0], gpu[1], winners(list(best.values()), min_gain))
    print(f"{out}: {n} plans from {len(best)} shapes")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=15, help="timed repeats per plan (default: %(default)s)")
    ap.add_argument("--max-per-engine", type=int, default=2000,
                    help="knob settings tried per engine at most (default: %(default)s)")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds per shape (default: %(default)s)")
    ap.add_argument("--shapes", type=int, default=len(SHAPES), help="the first N shapes (default: all %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--all-shapes", action="store_true",
                    help="every convolution shape of the U-Net call (bench/conv_shapes.py), not only the 64x64 level")
    ap.add_argument("--shape-range", default=None, metavar="A:B",
                    help="with --all-shapes: only shapes A to B-1 of its sorted list, to split a full sweep over calls")
    ap.add_argument("--engines", default="", help="comma-separated engine ids to sweep (default: all)")
    ap.add_argument("--write-plans", default=None, metavar="FILE",
                    help="write each shape's fastest plan that beats F.conv2d by --min-gain as a plans file for "
                         "speed.conv_plans (ldm/conv_plans.py)")
    ap.add_argument("--min-gain", type=float, default=0.03,
                    help="a plan goes into --write-plans if it is at least this fraction faster (default: %(default)s)")
    ap.add_argument("--out", default="cudnn_knobs.json")
    ap.add_argument("--from-results", nargs="+", default=None, metavar="JSON",
                    help="no GPU: merge earlier runs' JSON files (each shape's fastest plan over them) into "
                         "--write-plans")
    args = ap.parse_args()
    if args.from_results:
        if not args.write_plans:
            ap.error("--from-results needs --write-plans FILE")
        return merge(ap, args.from_results, args.write_plans, args.min_gain)
    span = None
    if args.shape_range:
        lo, sep, hi = args.shape_range.partition(":")
        if not args.all_shapes:
            ap.error("--shape-range needs --all-shapes")
        if not sep or not lo.isdigit() or not hi.isdigit() or int(lo) >= int(hi):
            ap.error(f"--shape-range: expected A:B with A < B, got {args.shape_range!r}")
        span = int(lo), int(hi)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    try:
        import cudnn
    except ImportError as err:
        ap.error(f"needs the nvidia-cudnn-frontend package ({err})")
    torch.backends.cudnn.benchmark = False
    handle = cudnn.create_handle()
    cudnn.set_stream(handle, torch.cuda.current_stream().cuda_stream)
    report = {"torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
              "frontend": getattr(cudnn, "__version__", "?"), "gpu": torch.cuda.get_device_name(), "shapes": []}
    shapes = [(xs, ws, 1, calls) for xs, ws, calls in SHAPES[: args.shapes]]
    if args.all_shapes:
        from bench.conv_shapes import conv_shapes

        shapes = [(xs, ws, st[0], calls) for (xs, ws, st, _pad), calls in sorted(conv_shapes(2, 64).items())]
        if span:
            shapes = shapes[span[0] : span[1]]
    engines_only = {int(e) for e in args.engines.split(",") if e} or None
    saved = total = 0.0
    for xs, ws, stride, calls in shapes:
        try:
            r = sweep_shape(handle, xs, ws, args.iters, args.max_per_engine, args.budget, args.seed, stride,
                            engines_only)
        except Exception as err:  # noqa: BLE001 - e.g. conv_in's 4 channels: no graph; report and go on
            print(f"x{calls} in {xs} w {ws} s{stride}: no cuDNN graph ({type(err).__name__}: {str(err)[:150]})")
            continue
        total += calls * r["torch_us"]
        r["calls"] = calls
        report["shapes"].append(r)
        best = r["best"][0] if r["best"] else None
        line = f"x{calls} in {xs} w {ws} s{stride}: F.conv2d {r['torch_us']:6.1f} us ({r['torch_tflops']:.0f} TFLOP/s)"
        if best:
            line += (f"  best of {r['timed']} plans ({r['engines']} engines) {best['us']:6.1f} us"
                     f" engine {best['engine']} {best['knobs']} err {best['err']:.1e}")
            saved += calls * max(0.0, r["torch_us"] - best["us"])
        print(line, f"[{r['configs']} settings, {r['tried']} tried, {r['failed']} failed, {r['seconds']:.0f} s]",
              flush=True)
        for e in r["errors"][:3]:
            print("    failed:", e, flush=True)
        for b in r["best"][:5]:
            print(f"    {b['us']:6.1f} us  engine {b['engine']:3d}  {b['knobs']}  err {b['err']:.1e}", flush=True)
    if args.write_plans:
        n = write_plans(args.write_plans, report["gpu"], report["cudnn"], winners(report["shapes"], args.min_gain))
        print(f"{args.write_plans}: {n} plans")
    report["saved_us_per_unet_call"] = saved
    report["conv2d_us_per_unet_call"] = total
    print(f"best plans would save {saved:.1f} of {total:.1f} us per U-Net call on these shapes")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
