"""U-Net and VAE speed, ours vs diffusers: the network-only cases of bench/perf.py (which holds the code).

    python bench/speed.py --out $OUT/speed.json [--compile]

is ``python bench/perf.py --only unet_b2,unet_b16,sdxl_b2,vae`` (``--compile`` adds ``unet_b2_compile``); any other
perf.py option passes through. BENCHMARKS.md, "Performance", has the tables and the method.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perf import main  # noqa: E402

if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if a != "--compile"]
    cases = "unet_b2,unet_b16,sdxl_b2,vae" + (",unet_b2_compile" if "--compile" in sys.argv[1:] else "")
    raise SystemExit(main(["--only", cases, *argv]))
