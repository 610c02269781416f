"""A grid of samples: one row per prompt, one column per seed (seeds 0..N-1), scaled up for viewing.

    python bench/sample_grid.py --model runs/cifar10/model-ema --prompts cifar10 --seeds 10 --cfg-scale 3 --out g.png
    python bench/sample_grid.py --model M --prompts "cat face" "rocket" --resolution 64 --out g.png

``--prompts cifar10``: the ten class captions. Sampling is ``Pipeline.__call__`` (dpmpp_2m, 25 steps by default).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from inference.grid import image_grid
from inference.pipeline import Pipeline
from ldm.metrics.cifar_net import CIFAR10_CLASSES, class_caption

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", nargs="+", required=True)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--cfg-scale", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--resolution", type=int)
    p.add_argument("--scale", type=int, default=2, help="nearest-neighbour upscaling of each image")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    prompts = [class_caption(c) for c in CIFAR10_CLASSES] if a.prompts == ["cifar10"] else a.prompts
    pipe = Pipeline.load(a.model, device=a.device)
    side = a.resolution or pipe.default_size[0]
    t = side * a.scale
    tiles = []
    for prompt in prompts:
        out = pipe([prompt] * a.seeds, seed=list(range(a.seeds)), steps=a.steps, sampler=a.sampler,
                   cfg_scale=a.cfg_scale, width=side, height=side)  # fmt: skip
        tiles += [im.resize((t, t), Image.NEAREST) for im in out.images]
    grid = image_grid(tiles, cols=a.seeds)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(a.out)
    print(f"wrote {a.out}: rows {prompts}, seeds 0..{a.seeds - 1}, cfg {a.cfg_scale}")
