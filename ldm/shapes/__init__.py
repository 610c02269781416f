"""Procedural captioned shapes: the data of the embedded default text-to-image model, and its checker.

A scene is one object ("a small blue square on the left") or two in a relation ("a green triangle above a
yellow circle"); it renders to a 32 or 64 px image, its caption parses back to it, and ``checker`` reads an
image back into objects to measure how well a generated image follows its prompt.

    vocab.py     the words and what they mean geometrically
    config.py    ShapesConfig (vocabulary subsets, probabilities, rendering, split, holdout)
    scene.py     Scene / SceneObject / Placement, sampling, the held-out split
    render.py    scene -> anti-aliased RGB image
    captions.py  scene <-> caption
    dataset.py   rows, iter_shapes, shapes_dataset (datasets.Dataset), prompt_set
    checker.py   detect, score, adherence
    control_maps.py  scene -> mask / edges maps aligned with the image (dataset columns with cfg.control_maps)
    placement.py     object_mask, mask_iou, placement_scores, the held-out control evaluation set and its chance level
"""
from ldm.shapes.captions import caption, parse_caption
from ldm.shapes.checker import Detected, adherence, detect, score
from ldm.shapes.config import CONTROL_MAPS, ShapesConfig
from ldm.shapes.control_maps import binary_mask, edges_array, mask_array, render_edges, render_mask
from ldm.shapes.dataset import iter_shapes, prompt_set, shapes_dataset, shapes_iterable_dataset, shapes_row
from ldm.shapes.placement import (
    ControlExample,
    chance_scores,
    control_eval_set,
    mask_iou,
    object_mask,
    placement_scores,
    random_layout_masks,
)
from ldm.shapes.render import coverage, render, render_array
from ldm.shapes.scene import Placement, Scene, SceneObject, is_held_out, make_scene, place
from ldm.shapes.vocab import COLOURS, POSITIONS, RELATIONS, SHAPES, SIZES

__all__ = [
    "COLOURS", "CONTROL_MAPS", "POSITIONS", "RELATIONS", "SHAPES", "SIZES",
    "ControlExample", "Detected", "Placement", "Scene", "SceneObject", "ShapesConfig",
    "adherence", "binary_mask", "caption", "chance_scores", "control_eval_set", "coverage", "detect", "edges_array",
    "is_held_out", "iter_shapes", "make_scene", "mask_array", "mask_iou", "object_mask", "parse_caption", "place",
    "placement_scores", "prompt_set", "random_layout_masks", "render", "render_array", "render_edges", "render_mask",
    "score", "shapes_dataset", "shapes_iterable_dataset", "shapes_row",
]
