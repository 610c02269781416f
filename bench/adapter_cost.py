"""What an SD 1.5 T2I-Adapter costs per sampling step when its features are recomputed at every step, as ldm did
before they were kept per hint (ldm/conditions/control.py): its forward on a CFG batch (2 x a 512x512 hint), bf16.

    python bench/adapter_cost.py --out $OUT/adapter_cost.json

CUDA events, the median of --reps calls, each timed alone ("ms") and 10 back to back ("b2b"). A 25-step run with
CFG saved 24 of these calls once the features were kept.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.perf_measure import back_to_back_ms, median_ms, randomize_  # noqa: E402
from ldm.t2i_adapter import T2IAdapter, T2IAdapterConfig  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--hint-channels", type=int, default=3)
    ap.add_argument("--out", default="adapter_cost.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    plan = SimpleNamespace(device="cuda", reps=args.reps, warmup=5)
    with torch.device("cuda"):
        net = T2IAdapter(T2IAdapterConfig(in_channels=args.hint_channels)).eval()
    randomize_(net, seed=1)
    net = net.to(torch.bfloat16)
    hint = torch.rand(2, args.hint_channels, 512, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        fn = lambda: net(hint, latent_size=(64, 64))  # noqa: E731
        row = {"ms": median_ms(fn, plan), "ms_b2b": back_to_back_ms(fn, plan),
               "params_m": sum(p.numel() for p in net.parameters()) / 1e6}  # fmt: skip
    row["saved_per_25_steps_ms"] = 24 * row["ms_b2b"]
    print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(),
                                          **row}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
