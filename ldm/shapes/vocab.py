"""The words of the shapes world and what each one means geometrically.

Everything the grammar (scene.py), the renderer (render.py), the captions (captions.py) and the checker
(checker.py) must agree on lives here, once: the palette, the shape names, the size ranges, where each
position word puts an object, and the tests the checker applies to positions and relations.

Coordinates are fractions of the image side with the origin at the top left (x to the right, y down), so
one scene renders at any resolution. An object is described by its centre (x, y) and its radius r: half the
side of its axis-aligned bounding box (the triangle points up and fills that box; see render.py).
"""
from __future__ import annotations

# Well separated hues (and black): >= 96 apart in RGB (orange / yellow are the closest pair) and >= 230 from the
# default light-grey background; white is left out because it would sit next to that background. The
# background is light so that every colour, yellow too, differs from it in luma, which JPEG keeps sharp.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 35),
    "orange": (255, 125, 0),
    "yellow": (240, 220, 0),
    "green": (30, 160, 50),
    "cyan": (0, 185, 215),
    "blue": (30, 70, 220),
    "purple": (140, 40, 170),
    "black": (25, 25, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
RELATIONS: tuple[str, ...] = ("above", "below", "left of", "right of")

DEFAULT_BACKGROUND: tuple[int, int, int] = (240, 240, 240)
MIN_BACKGROUND_DISTANCE = 100.0  # a palette colour closer than this (RGB distance) to the background is refused

# radius ranges (fraction of the side) a size word draws from; the checker splits them at SIZE_THRESHOLD
SIZE_RADIUS: dict[str, tuple[float, float]] = {"small": (0.115, 0.135), "large": (0.18, 0.21)}
SIZE_THRESHOLD = 0.1575
MARGIN = 0.05  # no object comes closer than this to the image border (so the border shows the background)
GAP = 0.05  # the least distance between the bounding boxes of two objects in a relation

# Where a single object with a position word is placed: allowed ranges of its centre, (x_lo, x_hi, y_lo, y_hi).
# Each lies inside the region the checker accepts for that word (position_holds) with a margin of >= 0.05.
POSITION_BOX: dict[str, tuple[float, float, float, float]] = {
    "left": (0.0, 0.35, 0.35, 0.65),
    "right": (0.65, 1.0, 0.35, 0.65),
    "top": (0.35, 0.65, 0.0, 0.35),
    "bottom": (0.35, 0.65, 0.65, 1.0),
    "center": (0.42, 0.58, 0.42, 0.58),
}
POSITION_LIMIT = 0.4  # checker: "left" means x < 0.4, "right" x > 0.6, "top" y < 0.4, "bottom" y > 0.6
CENTER_LIMIT = 0.15  # checker: "center" means |x - 0.5| < 0.15 and |y - 0.5| < 0.15
RELATION_SLOPE = 0.5  # generator: the cross-axis offset of a related pair is at most this times the main-axis one


def position_holds(position: str, x: float, y: float) -> bool:
    """Whether an object centred at (x, y) (fractions of the side) is at the named position."""
    if position == "left":
        return x < POSITION_LIMIT
    if position == "right":
        return x > 1.0 - POSITION_LIMIT
    if position == "top":
        return y < POSITION_LIMIT
    if position == "bottom":
        return y > 1.0 - POSITION_LIMIT
    if position == "center":
        return abs(x - 0.5) < CENTER_LIMIT and abs(y - 0.5) < CENTER_LIMIT
    raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")


def relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether centre ``a`` is <relation> centre ``b``: the offset must point the right way along the
    dominant axis (so a diagonal pair is "above" only if it is more above than beside)."""
    dx, dy = b[0] - a[0], b[1] - a[1]  # from a to b; y grows downwards
    if relation == "above":
        return dy > abs(dx)
    if relation == "below":
        return -dy > abs(dx)
    if relation == "left of":
        return dx > abs(dy)
    if relation == "right of":
        return -dx > abs(dy)
    raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")


def size_of_radius(radius: float) -> str:
    """The size word for a radius (fraction of the side)."""
    return "large" if radius > SIZE_THRESHOLD else "small"
