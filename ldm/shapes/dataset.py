"""The procedural shapes dataset as rows, an infinite iterator, a ``datasets.Dataset`` and evaluation prompts.

Row ``i`` of a split is drawn from its own generator ``numpy.random.default_rng([seed, split_code, i])``, so a
row never depends on how many rows were asked for, nor on the rows before it: ``shapes_dataset(10, cfg)`` is the
first ten rows of ``shapes_dataset(1000, cfg)`` and of ``iter_shapes(cfg)``.

Columns: ``image`` (PIL RGB), ``text`` (the caption), ``objects`` (JSON: the scene with placements, see
``Scene.to_json``; ``Scene.from_json`` reads it back), ``relation`` ("" for a single object), ``n_objects`` and
``index`` (the row number). With ``cfg.control_maps`` (config.py) also ``mask`` and / or ``edges``: PIL "L"
images of the row's scene, pixel-aligned with ``image`` (control_maps.py). The maps draw no random numbers, so
a row's scene and image do not depend on which maps are asked for.
"""
from __future__ import annotations

from dataclasses import replace
from itertools import count, islice
from typing import Iterator

import numpy as np

from ldm.shapes.captions import caption
from ldm.shapes.config import ShapesConfig
from ldm.shapes.control_maps import render_control_map
from ldm.shapes.render import render
from ldm.shapes.scene import make_scene

_SPLIT_CODE = {"train": 0, "test": 1}
_PROMPT_STREAM = 2  # the generator stream of prompt_set, apart from both splits' rows
_CONTROL_STREAM = 3  # the generator stream of placement.control_eval_set
PROMPT_KINDS = {"single": 1, "relation": 2}


def _check_cfg(cfg) -> ShapesConfig:
    if cfg is None:
        return ShapesConfig()
    if not isinstance(cfg, ShapesConfig):
        raise ValueError(f"cfg must be a ShapesConfig or None, got {type(cfg).__name__}")
    return cfg


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def shapes_row(index: int, cfg: ShapesConfig | None = None) -> dict:
    """Row ``index`` of the configured split."""
    cfg = _check_cfg(cfg)
    index = _check_count("index", index)
    rng = np.random.default_rng([cfg.seed, _SPLIT_CODE[cfg.split], index])
    scene = make_scene(rng, cfg)
    row = {
        "image": render(scene, cfg.image_size, cfg.background, cfg.supersample),
        "text": caption(scene),
        "objects": scene.to_json(),
        "relation": scene.relation or "",
        "n_objects": len(scene.objects),
        "index": index,
    }
    for name in cfg.control_maps:
        row[name] = render_control_map(name, scene, cfg.image_size, cfg.supersample)
    return row


def iter_shapes(cfg: ShapesConfig | None = None, start: int = 0) -> Iterator[dict]:
    """Rows ``start, start + 1, ...`` of the configured split, without end."""
    cfg = _check_cfg(cfg)
    start = _check_count("start", start)
    for index in count(start):
        yield shapes_row(index, cfg)


def _features(cfg: ShapesConfig):
    import datasets  # imported here: ldm.shapes works without `datasets` for rendering and checking

    return datasets.Features(
        {
            "image": datasets.Image(),
            "text": datasets.Value("string"),
            "objects": datasets.Value("string"),
            "relation": datasets.Value("string"),
            "n_objects": datasets.Value("int32"),
            "index": datasets.Value("int64"),
            **{name: datasets.Image() for name in cfg.control_maps},
        }
    )


def shapes_dataset(n: int, cfg: ShapesConfig | None = None):
    """The first ``n`` rows of the configured split as an in-memory ``datasets.Dataset`` (no cache files)."""
    import datasets

    cfg = _check_cfg(cfg)
    n = _check_count("n", n)
    rows = list(islice(iter_shapes(cfg), n))
    features = _features(cfg)
    columns = {name: [row[name] for row in rows] for name in features}
    return datasets.Dataset.from_dict(columns, features=features)


def shapes_iterable_dataset(cfg: ShapesConfig | None = None):
    """The configured split as an endless ``datasets.IterableDataset`` (rows in order, same as ``iter_shapes``)."""
    import datasets

    cfg = _check_cfg(cfg)
    return datasets.IterableDataset.from_generator(iter_shapes, gen_kwargs={"cfg": cfg}, features=_features(cfg))


def prompt_set(kind: str = "single", n: int = 200, seed: int = 0, cfg: ShapesConfig | None = None) -> list[str]:
    """``n`` held-out evaluation prompts: captions of test-split scenes with one object (``kind="single"``) or
    two objects in a relation (``kind="relation"``).

    The prompts follow ``cfg``'s vocabulary, mention probabilities and holdout (its ``split`` and ``seed`` are
    ignored), so none is ever a caption of that configuration's training split. A prompt may repeat when the
    held-out set is smaller than ``n``; the list for a larger ``n`` starts with the list for a smaller one.
    """
    if kind not in PROMPT_KINDS:
        raise ValueError(f"kind must be one of {tuple(PROMPT_KINDS)}, got {kind!r}")
    n = _check_count("n", n)
    seed = _check_count("seed", seed)
    cfg = replace(_check_cfg(cfg), split="test")
    rng = np.random.default_rng([seed, _PROMPT_STREAM, PROMPT_KINDS[kind]])
    return [caption(make_scene(rng, cfg, n_objects=PROMPT_KINDS[kind])) for _ in range(n)]
