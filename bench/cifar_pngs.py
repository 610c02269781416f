"""N CIFAR-10 training images, drawn at random (seed 0) from all classes, as PNGs for ``ldm analyze --data DIR``.

    python bench/cifar_pngs.py --data ../shared/data/cifar10 --n 5000 --out /tmp/cifar-png
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from ldm.metrics.cifar_data import load_cifar_split

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    x, y, names = load_cifar_split(a.data, "train")  # (N, 3, 32, 32) uint8; the parquet is sorted by class
    pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[: a.n]
    a.out.mkdir(parents=True, exist_ok=True)
    for k, i in enumerate(pick.tolist()):
        Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(a.out / f"{k:05d}-{names[int(y[i])]}.png")
    print(f"wrote {len(pick)} images to {a.out}")
