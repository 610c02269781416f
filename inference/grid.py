"""A contact sheet: images of one size laid out in rows, left to right, top to bottom.

    grid = image_grid(images, cols=4)   # ceil(len / 4) rows; empty cells stay black

``grid_columns`` picks the layout the command line uses: one row per prompt when there are several prompts with
several images each, otherwise as square as possible.
"""
from __future__ import annotations

import math
from typing import Sequence

from PIL import Image


def grid_columns(n_images: int, n_prompts: int) -> int:
    """n per prompt (one row per prompt) if several prompts have several images each, else ceil(sqrt(count))."""
    per_prompt = n_images // max(n_prompts, 1)
    if n_prompts > 1 and per_prompt > 1 and per_prompt * n_prompts == n_images:
        return per_prompt
    return max(1, math.ceil(math.sqrt(n_images)))


def image_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """One RGB image with ``images`` (all the same size) in a grid of ``cols`` columns (default: as square as
    possible); the last row is filled from the left."""
    if not images:
        raise ValueError("image_grid: no images")
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise ValueError(f"image_grid: images differ in size: {sorted(sizes)}")
    cols = cols or math.ceil(math.sqrt(len(images)))
    if cols < 1:
        raise ValueError(f"image_grid: cols must be >= 1, got {cols}")
    cols = min(cols, len(images))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for k, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((k % cols) * w, (k // cols) * h))
    return grid
