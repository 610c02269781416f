"""Scene -> RGB image: flat-coloured shapes on a plain background, anti-aliased by supersampling.

Each pixel's *coverage* by a shape is the fraction of its ``supersample x supersample`` sub-pixel sample points
(cell centres) inside the shape, and the pixel becomes ``background + coverage * (colour - background)``. So
every edge pixel lies on the line from the background to the object colour in RGB, which is what the checker
inverts (checker.py). The checker also uses ``coverage`` to draw its shape templates, so both agree on what a
"triangle" of a given radius is.

Shapes, all inside the axis-aligned box of half-side r around the centre (dx, dy measured from the centre,
y down):

    circle    dx^2 + dy^2 <= r^2                     area pi r^2
    square    |dx| <= r and |dy| <= r                area 4 r^2
    triangle  apex up at (0, -r), base on dy = r     area 2 r^2, centroid r/3 below the centre
    diamond   |dx| + |dy| <= r                       area 2 r^2
    cross     a plus sign with arms r/3 wide each side of the axes, area 20/9 r^2
"""
from __future__ import annotations

import numbers

import numpy as np
from PIL import Image

from ldm.shapes.scene import Scene
from ldm.shapes.vocab import COLOURS, DEFAULT_BACKGROUND, SHAPES

CROSS_HALF_WIDTH = 1.0 / 3.0  # half-width of a cross arm, in units of the radius

# area / r^2 and the offset of the centroid below the centre / r, for each shape (closed forms above)
SHAPE_AREA = {"circle": np.pi, "square": 4.0, "triangle": 2.0, "diamond": 2.0,
              "cross": 8 * CROSS_HALF_WIDTH - 4 * CROSS_HALF_WIDTH**2}
SHAPE_CENTROID_OFFSET = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 3.0, "diamond": 0.0, "cross": 0.0}


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether points (u, v), in units of the radius from the centre, lie inside the unit shape."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (au <= 1.0) & (av <= 1.0)
    if shape == "triangle":
        return (v <= 1.0) & (au <= (v + 1.0) / 2.0)
    if shape == "diamond":
        return au + av <= 1.0
    if shape == "cross":
        w = CROSS_HALF_WIDTH
        return ((au <= 1.0) & (av <= w)) | ((au <= w) & (av <= 1.0))
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def coverage(shape: str, x: float, y: float, radius: float, size: int, supersample: int = 4) -> np.ndarray:
    """(size, size) float array in [0, 1]: how much of each pixel the shape covers.

    ``x``, ``y`` (centre) and ``radius`` are fractions of the image side.
    """
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if isinstance(supersample, bool) or not isinstance(supersample, numbers.Integral) or supersample < 1:
        raise ValueError(f"supersample must be a positive integer, got {supersample!r}")
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius!r}")
    out = np.zeros((size, size), dtype=np.float64)
    # only the pixels of the bounding box (plus one) can be covered: evaluate there
    cx, cy, r = x * size, y * size, radius * size  # pixel units
    x0, x1 = max(int(np.floor(cx - r)) - 1, 0), min(int(np.ceil(cx + r)) + 1, size)
    y0, y1 = max(int(np.floor(cy - r)) - 1, 0), min(int(np.ceil(cy + r)) + 1, size)
    if x0 >= x1 or y0 >= y1:
        return out
    s = supersample
    sub = (np.arange(s) + 0.5) / s  # sample offsets inside a pixel
    xs = (np.arange(x0, x1)[:, None] + sub[None, :]).reshape(-1)  # (W' * s,)
    ys = (np.arange(y0, y1)[:, None] + sub[None, :]).reshape(-1)  # (H' * s,)
    inside = _inside(shape, (xs[None, :] - cx) / r, (ys[:, None] - cy) / r)  # (H' * s, W' * s)
    out[y0:y1, x0:x1] = inside.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))
    return out


def render_array(
    scene: Scene, size: int = 32, background: tuple[int, int, int] = DEFAULT_BACKGROUND, supersample: int = 4
) -> np.ndarray:
    """(size, size, 3) uint8 RGB image of a placed scene."""
    if scene.placements is None:
        raise ValueError("scene has no placements: render a scene from make_scene, or place(scene, rng) first")
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 8:
        raise ValueError(f"size must be an integer >= 8 (32 or 64 in practice), got {size!r}")
    bg = np.asarray(background, dtype=np.float64)
    if bg.shape != (3,) or not np.all((0 <= bg) & (bg <= 255)):
        raise ValueError(f"background must be three values in [0, 255] (R, G, B), got {background!r}")
    image = np.broadcast_to(bg, (size, size, 3)).copy()
    for obj, p in zip(scene.objects, scene.placements):
        alpha = coverage(obj.shape, p.x, p.y, p.radius, size, supersample)[..., None]  # (H, W, 1)
        image += alpha * (np.asarray(COLOURS[obj.colour], dtype=np.float64) - image)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render(
    scene: Scene, size: int = 32, background: tuple[int, int, int] = DEFAULT_BACKGROUND, supersample: int = 4
) -> Image.Image:
    """A placed scene as a PIL RGB image of ``size`` x ``size`` pixels."""
    return Image.fromarray(render_array(scene, size, background, supersample))  # (H, W, 3) uint8 -> RGB
