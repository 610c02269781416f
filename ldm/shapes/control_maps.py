"""Control maps of a scene: its objects' mask and outlines, pixel-aligned with the image render.py draws.

mask   Each pixel is 255 times the fraction of it that objects cover, with render.py's coverage
       (``render.coverage``: ``supersample x supersample`` sample points per pixel) and render.py's compositing:
       the mask is the renderer's image of white objects on black, ``m = 255 * (1 - prod_i (1 - a_i))``
       rounded to uint8 (``a_i``: coverage of object i; the objects of a scene never overlap, so this is the
       sum of their coverages). ``mask > 127`` is exactly ``coverage >= 0.5`` (127.5 rounds to 128): that
       *binary mask* is what placement.py compares with, and what the edges outline.
edges  The morphological gradient of the binary mask B with a 3 x 3 square: ``dilate(B) & ~erode(B)``, the
       pixels within one pixel (8-neighbour) of the outline, i.e. a 2 px band with one pixel inside the object
       and one outside. Binary: 255 on the band, 0 elsewhere (like the Canny maps ControlNet is trained on).
       Erosion counts the pixels beyond the image as object, so an object cut by the frame has no outline along
       the frame (no generated scene is: objects keep vocab.MARGIN from the border).

Both are deterministic functions of the placed scene (no random numbers), pure numpy and PIL ("L" images).
The binary dilation is the checker's (checker.dilate), so the checker and the maps share one neighbourhood.
"""
from __future__ import annotations

import numbers

import numpy as np
from PIL import Image

from ldm.shapes.checker import dilate
from ldm.shapes.render import coverage
from ldm.shapes.scene import Scene

MASK_THRESHOLD = 127  # binary mask: mask value > 127, i.e. coverage >= 0.5


def _check(scene: Scene, size: int, supersample: int) -> None:
    if not isinstance(scene, Scene):
        raise ValueError(f"scene must be a Scene, got {type(scene).__name__}")
    if scene.placements is None:
        raise ValueError("scene has no placements: use a scene from make_scene, or place(scene, rng) first")
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 8:
        raise ValueError(f"size must be an integer >= 8 (32 or 64 in practice), got {size!r}")
    if isinstance(supersample, bool) or not isinstance(supersample, numbers.Integral) or supersample < 1:
        raise ValueError(f"supersample must be a positive integer, got {supersample!r}")


def mask_array(scene: Scene, size: int = 32, supersample: int = 4) -> np.ndarray:
    """(size, size) uint8: 255 times the objects' coverage of each pixel (see the module docstring)."""
    _check(scene, size, supersample)
    empty = np.ones((size, size), dtype=np.float64)  # the uncovered fraction, prod_i (1 - a_i)
    for obj, p in zip(scene.objects, scene.placements):
        empty *= 1.0 - coverage(obj.shape, p.x, p.y, p.radius, size, supersample)
    return np.clip(np.rint(255.0 * (1.0 - empty)), 0, 255).astype(np.uint8)


def binary_mask(scene: Scene, size: int = 32, supersample: int = 4) -> np.ndarray:
    """(size, size) bool: the pixels objects cover at least half (``mask_array > 127``)."""
    return mask_array(scene, size, supersample) > MASK_THRESHOLD


def outline(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: the morphological gradient of a boolean mask with a 3 x 3 square (a 2 px band, see above)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be a 2-d boolean array, got shape {mask.shape}")
    eroded = ~dilate(~mask)  # beyond the image counts as object
    return dilate(mask) & ~eroded


def edges_array(scene: Scene, size: int = 32, supersample: int = 4) -> np.ndarray:
    """(size, size) uint8: 255 on the objects' outline band, 0 elsewhere (see the module docstring)."""
    return np.where(outline(binary_mask(scene, size, supersample)), 255, 0).astype(np.uint8)


def render_mask(scene: Scene, size: int = 32, supersample: int = 4) -> Image.Image:
    """The objects' coverage mask as a PIL "L" image, aligned with ``render(scene, size, ..., supersample)``."""
    return Image.fromarray(mask_array(scene, size, supersample))  # (H, W) uint8 -> "L"


def render_edges(scene: Scene, size: int = 32, supersample: int = 4) -> Image.Image:
    """The objects' outlines (a 2 px band, 0 / 255) as a PIL "L" image, aligned with ``render``."""
    return Image.fromarray(edges_array(scene, size, supersample))  # (H, W) uint8 -> "L"


def render_control_map(name: str, scene: Scene, size: int = 32, supersample: int = 4) -> Image.Image:
    """The map ``name`` ("mask" or "edges", config.CONTROL_MAPS) of a scene."""
    if name == "mask":
        return render_mask(scene, size, supersample)
    if name == "edges":
        return render_edges(scene, size, supersample)
    raise ValueError(f"control map must be 'mask' or 'edges', got {name!r}")
