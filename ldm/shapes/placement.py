"""Does an image put its objects where a control map says? Object masks, IoU, and the held-out evaluation set.

``object_mask(image)``: the pixels of an image that are not background, as a boolean (H, W) array.

1. Background: given, or estimated as the checker does (checker.estimate_background: median of the border).
2. Each pixel ``p`` is read as a blend of the background and one palette colour, as render.py draws it:
   ``p - bg = a (c - bg)``. Its colour ``c`` is the palette colour whose direction from the background is nearest
   (largest cosine with ``p - bg``), and its coverage estimate is ``a = |p - bg| / |c - bg|``.
3. The pixel is object when ``a >= threshold`` (default 15/32): a threshold on the colour distance to the
   background at about half the distance of the colour the pixel leans to, so the mask of a rendered image is
   its binary control mask (control_maps.py: coverage >= 0.5). With the default supersample 4 a pixel's
   coverage is a multiple of 1/16, and 15/32 lies halfway between the two levels around one half (7/16, 8/16):
   the exactly half-covered pixels that line a straight edge stay in despite the uint8 rounding of the image
   (which moves ``a`` by at most ``0.5 sqrt(3) / |c - bg| <= 0.009``: config.py keeps every colour >= 100 from
   the background), and pixel noise has the most room either way. (At 0.49 noise of 4/255 dropped a third of
   those half pixels; a small square with such an edge fell to IoU 0.89.) A fixed distance would not do: palette
   colours lie 230 (yellow) to 372 (black) from the default background, so dark objects would get a wider rim.
4. Specks: 8-connected components (checker.components) smaller than ``min_area`` pixels are dropped (default the
   checker's: 0.6% of the image, a quarter of the smallest object), e.g. stray noisy pixels of a generated image.

Noise of standard deviation ``s`` (of 255) moves ``a`` by about ``s / |c - bg|`` (0.017 for s = 4), so only
pixels covered close to half can flip; the background stays far below the threshold.

``mask_iou(pred, target)``: ``|pred & target| / |pred | target|``; two empty masks agree (1.0): nothing was to
be placed and nothing was. ``placement_scores`` is the IoU of each image's object mask with its target.

The evaluation set (``control_eval_set``) is made of held-out scenes (cfg's test split, so no prompt is a
training caption), each with its prompt (the scene's caption) and its control maps; ``random_layout_masks``
places the same descriptions again with an independent generator: the layouts of a model that follows the
prompt but ignores the map. Their IoU with the targets (``chance_scores``) is the chance level of the placement
measure: what a model gets without the control.
"""
from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import numpy as np
from PIL import Image

from ldm.shapes.captions import caption
from ldm.shapes.checker import components, estimate_background, to_array
from ldm.shapes.config import ShapesConfig
from ldm.shapes.control_maps import MASK_THRESHOLD, binary_mask, render_edges, render_mask
from ldm.shapes.dataset import _CONTROL_STREAM, PROMPT_KINDS, _check_cfg, _check_count
from ldm.shapes.scene import Scene, make_scene, place
from ldm.shapes.vocab import COLOURS

HALF_COVERED = 15 / 32  # object_mask's default threshold on the coverage estimate (see step 3 above)
_LAYOUT_DRAW = 1  # sub-stream of random_layout_masks, apart from control_eval_set's scenes


def object_mask(
    image,
    background=None,
    colours: tuple[str, ...] | None = None,
    threshold: float = HALF_COVERED,
    min_area: float | None = None,
) -> np.ndarray:
    """(H, W) bool: the object pixels of an image (see the module docstring).

    image: PIL image or (H, W, 3) array (uint8, or float in [0, 1]). background: RGB, or None to estimate it
    from the border. colours: the palette the objects are drawn from (default all). threshold: the least
    coverage estimate of an object pixel. min_area: components smaller than this many pixels are dropped
    (None: 0.6% of the image; 0 keeps all).
    """
    pixels = to_array(image)  # (H, W, 3) in [0, 255]
    h, w, _ = pixels.shape
    colours = tuple(COLOURS) if colours is None else tuple(colours)
    if not colours or any(c not in COLOURS for c in colours):
        raise ValueError(f"colours must be a non-empty subset of {tuple(COLOURS)}, got {colours!r}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    bg = estimate_background(pixels) if background is None else np.asarray(background, dtype=np.float64)
    if bg.shape != (3,):
        raise ValueError(f"background must be three values (R, G, B) or None, got {background!r}")
    offsets = np.array([COLOURS[c] for c in colours], dtype=np.float64) - bg  # (K, 3): c - bg
    lengths = np.linalg.norm(offsets, axis=1)  # (K,)
    if lengths.min() < 1.0:
        raise ValueError(f"background {tuple(bg)} is a palette colour: objects of that colour cannot be told apart")
    v = pixels - bg  # (H, W, 3)
    nearest = np.argmax(v @ (offsets / lengths[:, None]).T, axis=-1)  # (H, W): largest cosine (|v| is common)
    estimate = np.linalg.norm(v, axis=-1) / lengths[nearest]  # (H, W): coverage a = |p - bg| / |c - bg|
    mask = estimate >= threshold
    min_area = 0.006 * h * w if min_area is None else float(min_area)
    if min_area > 0 and mask.any():
        for part in components(mask):
            if part.sum() < min_area:
                mask &= ~part
    return mask


def as_mask(mask) -> np.ndarray:
    """A boolean (H, W) array from a bool array, a PIL image or uint8 array (> 127: a control mask's binary
    mask), or a float array in [0, 1] (>= 0.5)."""
    if isinstance(mask, Image.Image):
        return np.asarray(mask.convert("L")) > MASK_THRESHOLD
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"a mask must be 2-d (H, W), got shape {array.shape}")
    if array.dtype == bool:
        return array
    if array.dtype == np.uint8:
        return array > MASK_THRESHOLD
    if np.issubdtype(array.dtype, np.floating):
        return array >= 0.5
    raise ValueError(f"a mask must be bool, uint8 or float in [0, 1], got dtype {array.dtype}")


def mask_iou(pred, target) -> float:
    """Intersection over union of two masks of one shape (see ``as_mask``); 1.0 when both are empty."""
    pred, target = as_mask(pred), as_mask(target)
    if pred.shape != target.shape:
        raise ValueError(f"masks must have the same shape, got {pred.shape} and {target.shape}")
    union = np.count_nonzero(pred | target)
    return 1.0 if union == 0 else np.count_nonzero(pred & target) / union


def placement_scores(images, target_masks, background=None, **object_mask_kwargs) -> list[float]:
    """IoU of each image's object mask (``object_mask``) with its target mask (e.g. a control_eval_set mask)."""
    images, target_masks = list(images), list(target_masks)
    if len(images) != len(target_masks):
        raise ValueError(f"images and target_masks must be of equal length, got {len(images)} and {len(target_masks)}")
    return [mask_iou(object_mask(im, background, **object_mask_kwargs), t) for im, t in zip(images, target_masks)]


# ---------------------------------------------------------------- the evaluation set


class ControlExample(NamedTuple):
    """One held-out scene with its prompt and control maps (unpacks as ``prompt, mask, edges, scene``)."""

    prompt: str  # the scene's caption
    mask: Image.Image  # "L", control_maps.render_mask
    edges: Image.Image  # "L", control_maps.render_edges
    scene: Scene


def _eval_scenes(n: int, seed: int, cfg: ShapesConfig | None, kind: str) -> tuple[list[Scene], ShapesConfig]:
    if kind not in PROMPT_KINDS:
        raise ValueError(f"kind must be one of {tuple(PROMPT_KINDS)}, got {kind!r}")
    n, seed = _check_count("n", n), _check_count("seed", seed)
    cfg = replace(_check_cfg(cfg), split="test")
    rng = np.random.default_rng([seed, _CONTROL_STREAM, PROMPT_KINDS[kind]])
    return [make_scene(rng, cfg, n_objects=PROMPT_KINDS[kind]) for _ in range(n)], cfg


def control_eval_set(n: int = 200, seed: int = 0, cfg: ShapesConfig | None = None,
                     kind: str = "single") -> list[ControlExample]:
    """``n`` held-out scenes (cfg's test split; one object for ``kind="single"``, two in a relation for
    ``"relation"``), each with its caption as the prompt and its mask and edges at ``cfg.image_size``.

    Follows cfg's vocabulary, probabilities, holdout and rendering (its ``split`` and ``seed`` are ignored). The
    list for a larger ``n`` starts with the list for a smaller one; its scenes are not prompt_set's.
    """
    scenes, cfg = _eval_scenes(n, seed, cfg, kind)
    return [ControlExample(caption(s), render_mask(s, cfg.image_size, cfg.supersample),
                           render_edges(s, cfg.image_size, cfg.supersample), s) for s in scenes]


def random_layout_masks(n: int = 200, seed: int = 0, cfg: ShapesConfig | None = None,
                        kind: str = "single") -> list[np.ndarray]:
    """The chance reference of ``control_eval_set(n, seed, cfg, kind)``: item i is the binary mask (bool
    (H, W)) of scene i's description placed again by an independent generator (same prompt, so same colour,
    shape, stated size and position; a new layout)."""
    scenes, cfg = _eval_scenes(n, seed, cfg, kind)
    rng = np.random.default_rng([seed, _CONTROL_STREAM, PROMPT_KINDS[kind], _LAYOUT_DRAW])
    return [binary_mask(place(s.described(), rng), cfg.image_size, cfg.supersample) for s in scenes]


def chance_scores(n: int = 200, seed: int = 0, cfg: ShapesConfig | None = None, kind: str = "single") -> list[float]:
    """IoU of each control_eval_set target with its random layout (``random_layout_masks``): the placement
    scores of a model that draws what the prompt says where the map does not say."""
    examples = control_eval_set(n, seed, cfg, kind)
    layouts = random_layout_masks(n, seed, cfg, kind)
    return [mask_iou(layout, example.mask) for layout, example in zip(layouts, examples)]
