"""ShapesConfig: which scenes the procedural shapes dataset draws, how they are rendered, and which split.

The held-out split: every scene has a *key* (scene.holdout_keys) and a key is reserved for the test split by a
stable hash (blake2b, not Python's salted ``hash``) falling below ``holdout_fraction``. Two ways to choose keys:

- ``holdout="caption"``: the key is the scene's description in a canonical form ("a below b" is "b above a"),
  so no held-out prompt, nor a paraphrase of it through a swapped relation, is ever a training caption.
- ``holdout="combination"``: the keys are the (colour, shape) pairs; the ceil(fraction * n) pairs of least hash
  never appear in training at all, which tests composition ("purple triangle" when purple and triangles were
  seen, never together). Which pairs those are depends on ``colours`` and ``shapes``: keep them equal across
  the splits.

The hash depends only on the key, never on ``seed``, so any two seeds share one split.

``control_maps`` names extra dataset columns rendered from each row's scene, exactly aligned with its image
(control_maps.py): ``"mask"`` (the objects' coverage) and ``"edges"`` (their outlines). Empty by default, so a
dataset keeps its columns unless asked; the maps draw no random numbers, so asking for them changes no image.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

from ldm.shapes.vocab import (
    COLOURS,
    DEFAULT_BACKGROUND,
    MIN_BACKGROUND_DISTANCE,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
)

SPLITS = ("train", "test")
CONTROL_MAPS = ("mask", "edges")  # the map columns a dataset can carry, in column order
HOLDOUTS = ("caption", "combination")


@dataclass
class ShapesConfig:
    """The shapes world: vocabulary subsets, mention probabilities, rendering and split."""

    image_size: int = 32  # pixels per side (32 or 64 in practice; any size >= 16 renders)
    p_two: float = 0.5  # probability that a scene has two objects in a relation (else one object)
    p_size: float = 0.5  # probability that an object's size is stated ("small" / "large")
    p_position: float = 0.5  # probability that a single object's position is stated ("on the left" ...)
    colours: tuple[str, ...] = tuple(COLOURS)
    shapes: tuple[str, ...] = SHAPES
    sizes: tuple[str, ...] = SIZES
    positions: tuple[str, ...] = POSITIONS
    relations: tuple[str, ...] = RELATIONS
    background: tuple[int, int, int] = DEFAULT_BACKGROUND
    supersample: int = 4  # anti-aliasing: samples per pixel along each axis
    seed: int = 0
    split: str = "train"  # "train" or "test"
    holdout: str = "caption"  # "caption" or "combination" (see the module docstring)
    holdout_fraction: float = 0.1
    control_maps: tuple[str, ...] = ()  # extra columns, any of CONTROL_MAPS ("mask", "edges"); see control_maps.py

    def __post_init__(self) -> None:
        if not _is_int(self.image_size) or self.image_size < 16:
            raise ValueError(f"shapes.image_size must be an integer >= 16, got {self.image_size!r}")
        self.image_size = int(self.image_size)
        for name in ("p_two", "p_size", "p_position"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"shapes.{name} must be a probability in [0, 1], got {value!r}")
            setattr(self, name, float(value))
        self.colours = _subset("colours", self.colours, tuple(COLOURS))
        self.shapes = _subset("shapes", self.shapes, SHAPES)
        self.sizes = _subset("sizes", self.sizes, SIZES)
        self.positions = _subset("positions", self.positions, POSITIONS)
        self.relations = _subset("relations", self.relations, RELATIONS)
        if self.p_two > 0 and len(self.colours) * len(self.shapes) < 2:
            raise ValueError(
                "shapes.colours and shapes.shapes must allow two different (colour, shape) pairs when p_two > 0, "
                f"got colours={self.colours} shapes={self.shapes}"
            )
        self.background = _rgb("background", self.background)
        for name in self.colours:
            distance = math.dist(COLOURS[name], self.background)
            if distance < MIN_BACKGROUND_DISTANCE:
                raise ValueError(
                    f"shapes.background={self.background} is too close to the colour {name!r} {COLOURS[name]} "
                    f"(RGB distance {distance:.0f} < {MIN_BACKGROUND_DISTANCE:.0f}); choose another background "
                    "or drop that colour from shapes.colours"
                )
        if not _is_int(self.supersample) or not 1 <= self.supersample <= 16:
            raise ValueError(f"shapes.supersample must be an integer in [1, 16], got {self.supersample!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"shapes.seed must be a non-negative integer, got {self.seed!r}")
        self.seed, self.supersample = int(self.seed), int(self.supersample)
        if self.split not in SPLITS:
            raise ValueError(f"shapes.split must be one of {SPLITS}, got {self.split!r}")
        if self.holdout not in HOLDOUTS:
            raise ValueError(f"shapes.holdout must be one of {HOLDOUTS}, got {self.holdout!r}")
        if not _is_number(self.holdout_fraction) or not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"shapes.holdout_fraction must be a number in (0, 1), got {self.holdout_fraction!r}")
        self.holdout_fraction = float(self.holdout_fraction)
        if isinstance(self.control_maps, str):  # a bare string would iterate as characters
            self.control_maps = (self.control_maps,)
        try:
            maps = tuple(self.control_maps)
        except TypeError:
            maps = None
        if maps is None or any(m not in CONTROL_MAPS for m in maps) or len(set(maps)) != len(maps):
            raise ValueError(
                f"shapes.control_maps must be a list of distinct values from {CONTROL_MAPS} (may be empty), "
                f"got {self.control_maps!r}"
            )
        self.control_maps = tuple(m for m in CONTROL_MAPS if m in maps)  # column order does not depend on the list

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _subset(name: str, value, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(value, str):  # a bare string would iterate as characters
        value = (value,)
    try:
        chosen = tuple(value)
    except TypeError:
        chosen = None
    if not chosen or any(v not in allowed for v in chosen) or len(set(chosen)) != len(chosen):
        raise ValueError(f"shapes.{name} must be a non-empty list of distinct values from {allowed}, got {value!r}")
    return chosen


def _rgb(name: str, value) -> tuple[int, int, int]:
    try:
        rgb = tuple(value)
    except TypeError:
        rgb = ()
    if len(rgb) != 3 or any(not _is_int(c) or not 0 <= c <= 255 for c in rgb):
        raise ValueError(f"shapes.{name} must be three integers in [0, 255] (R, G, B), got {value!r}")
    return tuple(int(c) for c in rgb)
