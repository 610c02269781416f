"""The scene grammar: one object at an optional position, or two objects in a relation.

A ``Scene`` has two layers:

- the *description*, which is what a caption says: each object's colour, shape, optional size word and (for a
  lone object) optional position word, and for two objects the relation ``objects[0] <relation> objects[1]``;
- the *placements* (centre and radius of every object, fractions of the image side), which is what the renderer
  draws. ``parse_caption`` gives a description only (``placements is None``); ``place`` samples placements that
  make the description true; ``make_scene`` does both and keeps to the configured split.

An unstated size or position is a free choice of the sampler, never an in-between value: an object is always
clearly small or large, so the checker can read every image back into words.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from ldm.shapes.config import ShapesConfig
from ldm.shapes.vocab import (
    COLOURS,
    GAP,
    MARGIN,
    POSITION_BOX,
    POSITIONS,
    RELATION_SLOPE,
    RELATIONS,
    SHAPES,
    SIZE_RADIUS,
    SIZES,
)

_MAX_TRIES = 10_000  # rejection sampling of a scene in the requested split


@dataclass(frozen=True)
class SceneObject:
    """One object as words: colour, shape, and an optional size and (lone objects only) position."""

    colour: str
    shape: str
    size: str | None = None  # "small" / "large"; None: not stated
    position: str | None = None  # "left" / "right" / "top" / "bottom" / "center"; None: not stated

    def __post_init__(self) -> None:
        if self.colour not in COLOURS:
            raise ValueError(f"colour must be one of {tuple(COLOURS)}, got {self.colour!r}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if self.size is not None and self.size not in SIZES:
            raise ValueError(f"size must be one of {SIZES} or None, got {self.size!r}")
        if self.position is not None and self.position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS} or None, got {self.position!r}")


@dataclass(frozen=True)
class Placement:
    """Where an object is drawn: centre (x, y) and radius (half its bounding box side), fractions of the side."""

    x: float
    y: float
    radius: float

    def __post_init__(self) -> None:
        for name in ("x", "y"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"placement.{name} must be a fraction of the image side in [0, 1], got {value!r}")
        if not isinstance(self.radius, (int, float)) or not 0.0 < self.radius <= 0.5:
            raise ValueError(f"placement.radius must be in (0, 0.5], got {self.radius!r}")


@dataclass(frozen=True)
class Scene:
    """One object, or two objects with ``objects[0] <relation> objects[1]``; placements are optional."""

    objects: tuple[SceneObject, ...]
    relation: str | None = None
    placements: tuple[Placement, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        if len(self.objects) not in (1, 2) or not all(isinstance(o, SceneObject) for o in self.objects):
            raise ValueError(f"objects must be one or two SceneObject, got {self.objects!r}")
        if len(self.objects) == 1 and self.relation is not None:
            raise ValueError(f"relation must be None for a single object, got {self.relation!r}")
        if len(self.objects) == 2:
            if self.relation not in RELATIONS:
                raise ValueError(f"relation must be one of {RELATIONS} for two objects, got {self.relation!r}")
            if any(o.position is not None for o in self.objects):
                raise ValueError("position must be None for objects in a relation (the relation places them)")
        if self.placements is not None:
            object.__setattr__(self, "placements", tuple(self.placements))
            if len(self.placements) != len(self.objects) or not all(isinstance(p, Placement) for p in self.placements):
                raise ValueError(f"placements must be one Placement per object, got {self.placements!r}")

    def described(self) -> Scene:
        """The description alone (what a caption says), without placements."""
        return replace(self, placements=None)

    def to_dict(self) -> dict:
        objects = []
        for i, o in enumerate(self.objects):
            row = {"colour": o.colour, "shape": o.shape, "size": o.size, "position": o.position}
            if self.placements is not None:
                p = self.placements[i]
                row.update(x=p.x, y=p.y, radius=p.radius)
            objects.append(row)
        return {"objects": objects, "relation": self.relation}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        rows = data["objects"]
        objects = tuple(SceneObject(r["colour"], r["shape"], r.get("size"), r.get("position")) for r in rows)
        placed = all("x" in r for r in rows)
        placements = tuple(Placement(r["x"], r["y"], r["radius"]) for r in rows) if placed else None
        return cls(objects, data.get("relation"), placements)

    @classmethod
    def from_json(cls, text: str) -> Scene:
        return cls.from_dict(json.loads(text))


# ---------------------------------------------------------------- held-out split


def holdout_keys(scene: Scene, mode: str) -> tuple[str, ...]:
    """The keys that decide the split of a scene (see config.py): its canonical description, or its
    (colour, shape) pairs."""
    if mode == "combination":
        return tuple(f"{o.colour} {o.shape}" for o in scene.objects)
    if mode != "caption":
        raise ValueError(f"holdout mode must be 'caption' or 'combination', got {mode!r}")
    objects, relation = scene.objects, scene.relation
    if relation in ("below", "right of"):  # "a below b" says "b above a": one key for both
        objects, relation = objects[::-1], {"below": "above", "right of": "left of"}[relation]
    words = [f"{o.size or '-'} {o.colour} {o.shape} {o.position or '-'}" for o in objects]
    return (f" {relation} ".join(words),)


def key_hash(key: str) -> float:
    """A stable hash of a key, uniform in [0, 1)."""
    digest = hashlib.blake2b(f"ldm.shapes:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def held_out_pairs(cfg: ShapesConfig) -> frozenset[str]:
    """For ``holdout="combination"``: the ceil(fraction * n) (colour, shape) pairs with the smallest hash
    (at least one, and at least one left for training)."""
    return _held_out_pairs(cfg.colours, cfg.shapes, cfg.holdout_fraction)


@lru_cache(maxsize=64)
def _held_out_pairs(colours: tuple[str, ...], shapes: tuple[str, ...], fraction: float) -> frozenset[str]:
    pairs = sorted((f"{c} {s}" for c in colours for s in shapes), key=key_hash)
    count = min(max(1, math.ceil(fraction * len(pairs))), len(pairs) - 1)
    if count < 1:
        raise ValueError("holdout='combination' needs two or more (colour, shape) pairs in colours x shapes")
    return frozenset(pairs[:count])


def is_held_out(scene: Scene, cfg: ShapesConfig) -> bool:
    """Whether a scene belongs to the test split (its description, placements play no part)."""
    if cfg.holdout == "combination":
        reserved = held_out_pairs(cfg)
        return any(key in reserved for key in holdout_keys(scene, "combination"))
    return key_hash(holdout_keys(scene, "caption")[0]) < cfg.holdout_fraction


# ---------------------------------------------------------------- sampling


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def sample_description(rng: np.random.Generator, cfg: ShapesConfig, n_objects: int | None = None) -> Scene:
    """A random description from the configured vocabulary (either split)."""
    if n_objects is None:
        n_objects = 2 if rng.random() < cfg.p_two else 1
    if n_objects not in (1, 2):
        raise ValueError(f"n_objects must be 1, 2 or None, got {n_objects!r}")
    objects: list[SceneObject] = []
    while len(objects) < n_objects:
        colour, shape = _pick(rng, cfg.colours), _pick(rng, cfg.shapes)
        size = _pick(rng, cfg.sizes) if rng.random() < cfg.p_size else None
        position = _pick(rng, cfg.positions) if n_objects == 1 and rng.random() < cfg.p_position else None
        if any((o.colour, o.shape) == (colour, shape) for o in objects):
            continue  # two objects of one colour and shape would make the relation ambiguous
        objects.append(SceneObject(colour, shape, size, position))
    relation = _pick(rng, cfg.relations) if n_objects == 2 else None
    return Scene(tuple(objects), relation)


def _radius(rng: np.random.Generator, size: str | None) -> float:
    lo, hi = SIZE_RADIUS[size if size is not None else _pick(rng, SIZES)]
    return float(rng.uniform(lo, hi))


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    if lo > hi + 1e-12:
        raise ValueError(f"no room to place the object (range [{lo:.3f}, {hi:.3f}] is empty)")
    return float(rng.uniform(lo, hi)) if hi > lo else float(lo)


def place(scene: Scene, rng: np.random.Generator) -> Scene:
    """The scene with placements sampled so that its description holds (sizes, position, relation)."""
    radii = [_radius(rng, o.size) for o in scene.objects]
    if len(scene.objects) == 1:
        r, position = radii[0], scene.objects[0].position
        x_lo, x_hi, y_lo, y_hi = POSITION_BOX[position] if position else (0.0, 1.0, 0.0, 1.0)
        x = _uniform(rng, max(x_lo, MARGIN + r), min(x_hi, 1.0 - MARGIN - r))
        y = _uniform(rng, max(y_lo, MARGIN + r), min(y_hi, 1.0 - MARGIN - r))
        return replace(scene, placements=(Placement(x, y, r),))

    # order the pair along one axis: p comes first (smaller coordinate), q second
    first = scene.relation in ("above", "left of")
    p, q = (0, 1) if first else (1, 0)
    rp, rq = radii[p], radii[q]
    gap = _uniform(rng, rp + rq + GAP, 1.0 - 2 * MARGIN - rp - rq)  # centre distance along the main axis
    p_main = _uniform(rng, MARGIN + rp, 1.0 - MARGIN - rq - gap)
    for _ in range(100):  # cross-axis offset within the slope, such that both stay inside the image
        offset = float(rng.uniform(-RELATION_SLOPE, RELATION_SLOPE)) * gap
        lo, hi = max(MARGIN + rp, MARGIN + rq - offset), min(1.0 - MARGIN - rp, 1.0 - MARGIN - rq - offset)
        if lo <= hi:
            break
    else:
        offset, lo, hi = 0.0, MARGIN + max(rp, rq), 1.0 - MARGIN - max(rp, rq)
    p_cross = _uniform(rng, lo, hi)
    centres = {p: (p_main, p_cross), q: (p_main + gap, p_cross + offset)}
    vertical = scene.relation in ("above", "below")
    placements = []
    for i in range(2):
        main, cross = centres[i]
        x, y = (cross, main) if vertical else (main, cross)
        placements.append(Placement(x, y, radii[i]))
    return replace(scene, placements=tuple(placements))


def make_scene(rng: np.random.Generator, cfg: ShapesConfig | None = None, n_objects: int | None = None) -> Scene:
    """A random placed scene of ``cfg.split`` (train scenes are never held out, test scenes always are)."""
    cfg = cfg if cfg is not None else ShapesConfig()
    want_held_out = cfg.split == "test"
    for _ in range(_MAX_TRIES):
        description = sample_description(rng, cfg, n_objects)
        if is_held_out(description, cfg) == want_held_out:
            return place(description, rng)
    raise ValueError(
        f"found no {cfg.split!r} scene in {_MAX_TRIES} tries: shapes.holdout_fraction={cfg.holdout_fraction} "
        "leaves that split (nearly) empty for this vocabulary"
    )
