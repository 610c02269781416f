"""Read an image back into objects, and score how well it follows a prompt of the shapes grammar.

``detect`` (all steps in numpy; robust to the noise, blur and compression of a generated 32 px image):

1. Background: the per-channel median of the border pixels (objects keep off the border, see vocab.MARGIN).
2. Colour unmixing per pixel: a rendered pixel is ``bg + a * (c - bg)`` (render.py), so for each palette colour
   ``c`` the pixel's coverage is ``a_c = <p - bg, c - bg> / |c - bg|^2`` and its residual is the distance of
   ``p`` from the segment bg..c. A pixel is *foreground* when some colour covers at least half of it
   (``a_c >= 0.5``) with a residual under ``colour_tolerance``; its label is that colour of least residual.
   Unmixing (rather than nearest colour) keeps the anti-aliased rim of a blue shape from reading as purple.
3. Connected components (8-neighbour) of the foreground; within one, a colour is kept only if it labels
   enough pixels (noise flecks of a neighbouring hue join the main colour); each colour's pixels are split
   into components again, and blobs smaller than ``min_area`` are dropped.
   A small blob beside a much larger one that fits no shape is that blob's JPEG ringing or colour fringe, and
   is dropped too.
4. Soft mask of each blob: its coverage over the blob grown by three pixels (blur tails), measured mostly in
   luma, which JPEG keeps at full resolution while it halves the chroma. Area and centroid of the soft mask
   survive blur, which moves coverage around but keeps its sum. (Normalising the mask, or thresholding it,
   would not: a blurred small cross then reads as a diamond.)
5. Shape by template matching: each shape is drawn (render.coverage) with the blob's area and centroid (area
   and centroid offset in closed form, render.SHAPE_AREA), at a few scales and blurred by each of
   TEMPLATE_BLURS, and the shape of largest cosine similarity ``<m, t> / (|m| |t|)`` wins. The best template
   gives the radius (hence the size word) and the centre the generator placed (a triangle's centroid lies r/3
   below it).

Measured on 200 random rendered 32 px scenes (one or two objects), counting a scene right only when every
check of ``score`` passes: 200 clean; 200 with noise sigma 8 (of 255), blur sigma 0.6 px and JPEG quality 85
(4:2:0 chroma); 200 with blur 1.0 px, noise 5 and JPEG 90; 198 with blur 0.8, noise 12 and JPEG 75; 181 with
blur 1.3 px, where a small cross starts to read as a diamond. About 10 ms per 32 px image on one CPU core.

``score`` parses the prompt (captions.parse_caption), pairs prompt objects with detections of the same colour
and shape, and checks count, sizes, position and relation with the rules in vocab.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import permutations

import numpy as np
from PIL import Image

from ldm.shapes.captions import parse_caption
from ldm.shapes.render import SHAPE_AREA, SHAPE_CENTROID_OFFSET, coverage
from ldm.shapes.vocab import COLOURS, SHAPES, position_holds, relation_holds, size_of_radius

TEMPLATE_BLURS = (0.0, 0.5, 0.8, 1.2)  # pixels: each shape template is matched sharp and blurred by these
TEMPLATE_SCALES = (1.0, 1.1, 1.2)  # template radius / the radius of the mask's area (pale colours read smaller)
HALO_MATCH = 0.8  # a small blob beside a big one is kept only if it fits a shape at least this well
_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


@dataclass(frozen=True)
class Detected:
    """One object found in an image. Coordinates: ``center`` and ``radius`` are fractions of the side; ``bbox``
    (x0, y0, x1, y1, exclusive end) and ``area`` are in pixels."""

    colour: str
    shape: str
    size: str  # "small" / "large", from the fitted radius
    center: tuple[float, float]  # (x, y): centre of the fitted shape's bounding box
    radius: float
    bbox: tuple[int, int, int, int]
    area: float  # soft (coverage-weighted) area
    match: float  # cosine similarity of the blob's soft mask and the chosen shape's template, in [0, 1]


# ---------------------------------------------------------------- image helpers


def to_array(image) -> np.ndarray:
    """(H, W, 3) float64 in [0, 255] from a PIL image or an (H, W, 3) array (uint8, or float in [0, 1])."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 8:
            raise ValueError(f"image must be (H, W, 3) with H, W >= 8, got an array of shape {image.shape}")
        if image.dtype == np.uint8:
            return image.astype(np.float64)
        if np.issubdtype(image.dtype, np.floating):
            return np.clip(image.astype(np.float64), 0.0, 1.0) * 255.0
        raise ValueError(f"image array must be uint8 or float in [0, 1], got dtype {image.dtype}")
    raise ValueError(f"image must be a PIL image or an (H, W, 3) numpy array, got {type(image).__name__}")


def estimate_background(pixels: np.ndarray) -> np.ndarray:
    """The per-channel median of the one-pixel border: (3,)."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    return np.median(border, axis=0)


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``mask`` moved by (dy, dx), zero-filled: out[y, x] = mask[y - dy, x - dx]."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    target = (slice(max(dy, 0), h + min(dy, 0)), slice(max(dx, 0), w + min(dx, 0)))
    source = (slice(max(-dy, 0), h - max(dy, 0)), slice(max(-dx, 0), w - max(dx, 0)))
    out[target] = mask[source]
    return out


def dilate(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """8-neighbour binary dilation, ``steps`` times."""
    for _ in range(steps):
        grown = mask.copy()
        for dy, dx in _NEIGHBOURS:
            grown |= _shift(mask, dy, dx)
        mask = grown
    return mask


def components(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected components of a boolean mask, as boolean masks (min-label propagation)."""
    h, w = mask.shape
    big = h * w + 1
    labels = np.where(mask, np.arange(h * w).reshape(h, w), big)
    while True:
        low = labels.copy()
        for dy, dx in _NEIGHBOURS:
            shifted = _shift(labels - big, dy, dx) + big  # zero fill becomes "no label"
            low = np.minimum(low, shifted)
        low = np.where(mask, low, big)
        if np.array_equal(low, labels):
            break
        labels = low
    return [labels == v for v in np.unique(labels[mask])]


# ---------------------------------------------------------------- detection


def _unmix(pixels: np.ndarray, background: np.ndarray, colours: tuple[str, ...]):
    """Per pixel and colour: coverage a (H, W, K) and residual distance from the segment bg..colour (H, W, K)."""
    offsets = np.array([COLOURS[c] for c in colours], dtype=np.float64) - background  # (K, 3)
    v = pixels - background  # (H, W, 3)
    alpha = v @ offsets.T / np.sum(offsets**2, axis=1)  # (H, W, K)
    on_segment = np.clip(alpha, 0.0, 1.0)[..., None] * offsets  # (H, W, K, 3)
    residual = np.linalg.norm(v[:, :, None, :] - on_segment, axis=-1)  # (H, W, K)
    return alpha, residual


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-d array (zero outside); sigma in pixels, 0 returns the input."""
    if sigma <= 0:
        return image
    radius = int(np.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(image, radius)
    rows = sum(t * padded[:, i : i + image.shape[1]] for i, t in enumerate(taps))  # along x
    return sum(t * rows[i : i + image.shape[0], :] for i, t in enumerate(taps))  # along y


# Coverage for the soft mask is measured mostly in luma: JPEG keeps luma at full resolution but halves the
# chroma resolution (4:2:0), which would smear the mask of a small object. The metric is |M v|^2 with the
# JPEG RGB -> YCbCr rows M, chroma weighted by CHROMA_WEIGHT; colours without luma contrast (yellow on grey)
# fall back on chroma by themselves, since their luma term vanishes.
_YCBCR = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
CHROMA_WEIGHT = 0.05
_LUMA_METRIC = _YCBCR.T @ np.diag([1.0, CHROMA_WEIGHT, CHROMA_WEIGHT]) @ _YCBCR  # (3, 3)


def _coverage_luma(pixels: np.ndarray, background: np.ndarray, colour: str) -> np.ndarray:
    """(H, W) coverage of one colour, least squares in the luma-weighted metric."""
    d = np.asarray(COLOURS[colour], dtype=np.float64) - background  # (3,)
    gd = _LUMA_METRIC @ d
    return (pixels - background) @ gd / (d @ gd)


def _classify_shape(soft: np.ndarray, shapes: tuple[str, ...]) -> tuple[str, float, float, tuple[float, float]]:
    """Best template for a soft mask: (shape, cosine similarity, radius, centre), radius and centre as fractions.

    Each shape is drawn at the radius its area formula gives for the mask's area, and at TEMPLATE_SCALES times
    that: a paler colour than the palette's (a generated image) lowers the mask's amplitude and so its area.
    The cosine similarity ignores the amplitude; the radius divides the area by it (the least-squares gain of
    the best template), so the size read does not depend on how saturated the colour is.
    """
    size = soft.shape[0]
    area = soft.sum()
    ys, xs = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    cx, cy = (soft * xs).sum() / area, (soft * ys).sum() / area
    norm = np.sqrt((soft**2).sum())
    best = ("", -1.0, 0.0, (0.0, 0.0))
    for shape in shapes:
        for scale in TEMPLATE_SCALES:
            r = scale * np.sqrt(area / SHAPE_AREA[shape])  # pixels
            centre = (cx / size, (cy - SHAPE_CENTROID_OFFSET[shape] * r) / size)
            sharp = coverage(shape, centre[0], centre[1], r / size, size, supersample=4)
            for sigma in TEMPLATE_BLURS:  # the image may be blurred (or its chroma subsampled, as JPEG does)
                template = gaussian_blur(sharp, sigma)
                dot, tt = (soft * template).sum(), (template**2).sum()
                match = dot / (norm * np.sqrt(tt))  # cosine similarity
                if match > best[1]:
                    amplitude = np.clip(dot / tt, 0.5, 2.0)  # least-squares gain of the template on the mask
                    radius = np.sqrt(area / (amplitude * SHAPE_AREA[shape])) / size
                    best = (shape, float(match), float(radius), (float(centre[0]), float(centre[1])))
    return best


def _soft_mask(pixels: np.ndarray, bg: np.ndarray, colour: str, mask: np.ndarray, others: np.ndarray) -> np.ndarray:
    """(H, W) coverage of a blob's colour over the blob grown by three pixels (blur tails), not into ``others``."""
    a = _coverage_luma(pixels, bg, colour)
    soft = np.where(dilate(mask, 3) & ~others, np.clip(a, 0.0, 1.5), 0.0)  # above 1: noise, or a stronger colour
    soft[~mask & (soft < 0.05)] = 0.0  # background noise in the rim
    if soft.sum() < 1.0:  # a colour with no luma contrast and weak chroma: fall back on the blob itself
        soft = mask.astype(np.float64)
    return soft


def _drop_halos(blobs, pixels, bg, colours, shapes):
    """Drop the fringes of other blobs: a blob within two pixels of one at least twice its size whose shape fits
    no template (cosine < HALO_MATCH) is JPEG ringing or a colour fringe of that blob, not an object."""
    kept = []
    for j, (k, mask) in enumerate(blobs):
        n = mask.sum()
        beside = [other for i, (_, other) in enumerate(blobs) if i != j and other.sum() >= 2 * n]
        if any((mask & dilate(other, 2)).any() for other in beside):
            others = np.zeros_like(mask)
            for _, other in blobs:
                others |= other & ~mask
            if _classify_shape(_soft_mask(pixels, bg, colours[k], mask, others), shapes)[1] < HALO_MATCH:
                continue
        kept.append((k, mask))
    return kept


def detect(
    image,
    colours: tuple[str, ...] | None = None,
    shapes: tuple[str, ...] | None = None,
    background=None,
    colour_tolerance: float = 70.0,
    min_area: float | None = None,
) -> list[Detected]:
    """Objects in an image, largest first.

    image: PIL image or (H, W, 3) array (uint8, or float in [0, 1]). colours / shapes: the palette and shapes
    to look for (default: all). background: RGB, or None to estimate it from the border. colour_tolerance: the
    largest RGB distance of a pixel from the background..colour segment. min_area: the smallest blob kept, in
    pixels (default 0.6% of the image: a quarter of the smallest object).
    """
    pixels = to_array(image)
    h, w, _ = pixels.shape
    if h != w:
        raise ValueError(f"image must be square, got {w}x{h}")
    colours = tuple(COLOURS) if colours is None else tuple(colours)
    shapes = SHAPES if shapes is None else tuple(shapes)
    if not colours or any(c not in COLOURS for c in colours):
        raise ValueError(f"colours must be a non-empty subset of {tuple(COLOURS)}, got {colours!r}")
    if not shapes or any(s not in SHAPES for s in shapes):
        raise ValueError(f"shapes must be a non-empty subset of {SHAPES}, got {shapes!r}")
    if not colour_tolerance > 0:
        raise ValueError(f"colour_tolerance must be > 0, got {colour_tolerance!r}")
    min_area = 0.006 * h * w if min_area is None else float(min_area)
    bg = estimate_background(pixels) if background is None else np.asarray(background, dtype=np.float64)
    if bg.shape != (3,):
        raise ValueError(f"background must be three values (R, G, B) or None, got {background!r}")

    alpha, residual = _unmix(pixels, bg, colours)
    fit = np.where(alpha >= 0.5, residual, np.inf)  # (H, W, K)
    label = np.argmin(fit, axis=-1)  # (H, W)
    foreground = np.min(fit, axis=-1) <= colour_tolerance

    blobs: list[tuple[int, np.ndarray]] = []  # (colour index, mask)
    for region in components(foreground):
        counts = np.bincount(label[region], minlength=len(colours))
        kept = [k for k in np.flatnonzero(counts) if counts[k] >= max(min_area, 0.2 * region.sum())]
        if not kept:
            continue
        # every pixel of the region joins the kept colour that explains it best
        choice = np.array(kept)[np.argmin(fit[region][:, kept], axis=-1)]
        assigned = np.full((h, w), -1)
        assigned[region] = choice
        for k in kept:
            blobs += [(k, part) for part in components(assigned == k) if part.sum() >= min_area]

    blobs = _drop_halos(blobs, pixels, bg, colours, shapes)
    found = []
    for k, mask in blobs:
        others = np.zeros((h, w), dtype=bool)
        for _, other in blobs:
            others |= other & ~mask
        soft = _soft_mask(pixels, bg, colours[k], mask, others)
        shape, match, radius, centre = _classify_shape(soft, shapes)
        ys, xs = np.nonzero(mask)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        size = size_of_radius(radius)
        found.append(Detected(colours[k], shape, size, centre, radius, bbox, float(soft.sum()), match))
    return sorted(found, key=lambda d: -d.area)


# ---------------------------------------------------------------- scoring


def _assignments(wanted, found: list[Detected]) -> list[tuple[Detected, ...]]:
    """Every way to give each prompt object its own detection of the same colour and shape, largest first."""
    fits = [chosen for chosen in permutations(found, len(wanted))
            if all((d.colour, d.shape) == (o.colour, o.shape) for d, o in zip(chosen, wanted))]
    return sorted(fits, key=lambda chosen: -sum(d.area for d in chosen))


def score(prompt: str, image, **detect_kwargs) -> dict:
    """How an image follows a prompt of the shapes grammar.

    Keys: ``colour_ok`` / ``shape_ok`` (the multisets of detected colours / shapes equal the prompt's),
    ``count_ok`` (as many objects as the prompt names), ``colour_shape_ok`` (every object found with its colour
    and shape, nothing else there), ``size_ok`` / ``position_ok`` / ``relation_ok`` (None where the prompt states
    none; False when the objects are not found), ``ok`` (every check that applies), ``n_detected`` and
    ``detections``.
    """
    scene = parse_caption(prompt)
    found = detect(image, **detect_kwargs)
    wanted = scene.objects
    fits = _assignments(wanted, found)
    matched = fits[0] if fits else None
    count_ok = len(found) == len(wanted)
    result = {
        "colour_ok": sorted(d.colour for d in found) == sorted(o.colour for o in wanted),
        "shape_ok": sorted(d.shape for d in found) == sorted(o.shape for o in wanted),
        "count_ok": count_ok,
        "colour_shape_ok": matched is not None and count_ok,
        "size_ok": None,
        "position_ok": None,
        "relation_ok": None,
    }
    if any(o.size for o in wanted):
        result["size_ok"] = matched is not None and all(o.size in (None, d.size) for o, d in zip(wanted, matched))
    if wanted[0].position is not None:
        result["position_ok"] = matched is not None and position_holds(wanted[0].position, *matched[0].center)
    if scene.relation is not None:
        # any fitting assignment will do ("a red circle above a red circle" has two)
        result["relation_ok"] = any(relation_holds(scene.relation, a.center, b.center) for a, b in fits)
    checks = [result[k] for k in ("colour_shape_ok", "size_ok", "position_ok", "relation_ok")]
    result["ok"] = all(c for c in checks if c is not None)
    result["n_detected"] = len(found)
    result["detections"] = found
    return result


_SUMMARY_KEYS = ("colour_ok", "shape_ok", "count_ok", "colour_shape_ok", "size_ok", "position_ok", "relation_ok", "ok")


def _fractions(rows: list[dict]) -> dict:
    out = {"n": len(rows)}
    for key in _SUMMARY_KEYS:
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def adherence(prompts, images, **detect_kwargs) -> dict:
    """Fractions of prompt/image pairs passing each check of ``score`` (None where no prompt states it), over
    all pairs and ``by_kind`` ("single": one object, "relation": two), plus the per-pair ``scores``."""
    prompts, images = list(prompts), list(images)
    if len(prompts) != len(images) or not prompts:
        raise ValueError(
            f"prompts and images must be non-empty and of equal length, got {len(prompts)} and {len(images)}"
        )
    rows = [score(p, im, **detect_kwargs) for p, im in zip(prompts, images)]
    kinds = {"single": [r for r in rows if r["relation_ok"] is None],
             "relation": [r for r in rows if r["relation_ok"] is not None]}
    summary = _fractions(rows)
    summary["by_kind"] = {kind: _fractions(rs) for kind, rs in kinds.items() if rs}
    summary["scores"] = [{k: v for k, v in r.items() if k != "detections"} for r in rows]
    return summary
