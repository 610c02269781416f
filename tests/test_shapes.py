"""The procedural shapes dataset: grammar, rendering, captions, split and the datasets wrapper (ldm/shapes/).

Expectations are written out by hand (pixel values of a grid-aligned square, closed-form areas, literal
captions, literal position thresholds) rather than taken from the code under test.
"""
import json
import math

import numpy as np
import pytest
from PIL import Image

from ldm.shapes import (
    COLOURS,
    Placement,
    Scene,
    SceneObject,
    ShapesConfig,
    caption,
    iter_shapes,
    make_scene,
    parse_caption,
    prompt_set,
    render,
    shapes_dataset,
    shapes_iterable_dataset,
)
from ldm.shapes.dataset import shapes_row
from ldm.shapes.render import render_array
from ldm.shapes.scene import held_out_pairs, is_held_out, sample_description

BG = (240, 240, 240)


def one(colour, shape, size=None, position=None, at=None):
    placements = None if at is None else (Placement(*at),)
    return Scene((SceneObject(colour, shape, size, position),), None, placements)


# ---------------------------------------------------------------- rendering


def test_grid_aligned_square_is_exact():
    # centre (16, 16) px, half side 8 px: covers pixels 8..23 fully, nothing else
    image = render_array(one("red", "square", at=(0.5, 0.5, 0.25)), size=32, background=BG)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert (image[8:24, 8:24] == (215, 25, 35)).all()
    outside = np.ones((32, 32), dtype=bool)
    outside[8:24, 8:24] = False
    assert (image[outside] == BG).all()


def test_half_covered_pixels_blend_half_way():
    # square edge at x = 8.5 px: column 8 is half covered -> halfway between background and colour
    image = render_array(one("black", "square", at=(16.5 / 32, 0.5, 8 / 32)), size=32, background=BG)
    assert tuple(image[16, 8]) == tuple(round((240 + 25) / 2) for _ in range(3))  # 132.5 -> 132 (banker's)
    assert tuple(image[16, 9]) == (25, 25, 25)


@pytest.mark.parametrize(
    "shape, area_over_r2",
    [("circle", math.pi), ("square", 4.0), ("triangle", 2.0), ("diamond", 2.0), ("cross", 4 * (2 / 3) - (2 / 3) ** 2)],
)
def test_rendered_area_matches_closed_form(shape, area_over_r2):
    # coverage summed over pixels = area; cross: two 2r x 2r/3 bars overlapping in a 2r/3 square
    r_px = 10.5  # edges (centre 32 +- 10.5, cross arms +- 3.5) fall between sample rows: no aliasing bias
    image = render_array(one("blue", shape, at=(0.5, 0.5, r_px / 64)), size=64, background=BG, supersample=8)
    coverage = (BG[0] - image[..., 0].astype(float)) / (BG[0] - 30)  # red channel: 240 -> 30
    assert coverage.sum() == pytest.approx(area_over_r2 * r_px**2, rel=0.015)


def test_triangle_points_up():
    image = render_array(one("black", "triangle", at=(0.5, 0.5, 0.3)), size=32)
    dark = image[..., 0] < 128
    rows = dark.sum(axis=1)
    top, bottom = np.flatnonzero(rows)[[0, -1]]
    assert rows[top] < rows[bottom]  # narrow apex at the top, wide base at the bottom


def test_render_is_deterministic_and_seeded():
    cfg = ShapesConfig(seed=7)
    a = render(make_scene(np.random.default_rng(1), cfg), 32).tobytes()
    b = render(make_scene(np.random.default_rng(1), cfg), 32).tobytes()
    c = render(make_scene(np.random.default_rng(2), cfg), 32).tobytes()
    assert a == b and a != c


def test_render_needs_placements_and_valid_size():
    with pytest.raises(ValueError, match="placements"):
        render(one("red", "circle"))
    with pytest.raises(ValueError, match="size"):
        render(one("red", "circle", at=(0.5, 0.5, 0.2)), size=4)


# ---------------------------------------------------------------- captions


@pytest.mark.parametrize(
    "scene, text",
    [
        (one("red", "circle"), "a red circle"),
        (one("blue", "square", "small", "left"), "a small blue square on the left"),
        (one("orange", "cross", None, "top"), "an orange cross at the top"),
        (one("black", "diamond", "large", "center"), "a large black diamond in the center"),
        (Scene((SceneObject("green", "triangle"), SceneObject("yellow", "circle")), "above"),
         "a green triangle above a yellow circle"),
        (Scene((SceneObject("orange", "square", "small"), SceneObject("cyan", "cross", "large")), "right of"),
         "a small orange square to the right of a large cyan cross"),
    ],
)
def test_caption_examples(scene, text):
    assert caption(scene) == text
    assert parse_caption(text) == scene


def test_parse_accepts_case_punctuation_and_synonyms():
    assert parse_caption("  A Red Circle. ") == one("red", "circle")
    assert parse_caption("a red circle in the middle") == one("red", "circle", None, "center")
    assert parse_caption("a red circle in the centre") == one("red", "circle", None, "center")
    left = Scene((SceneObject("red", "circle"), SceneObject("blue", "square")), "left of")
    assert parse_caption("a red circle left of a blue square") == left
    assert parse_caption("red circle to the left of blue square") == left
    on_top = Scene((SceneObject("red", "circle"), SceneObject("blue", "square")), "above")
    assert parse_caption("a red circle on top of a blue square") == on_top


def test_caption_parse_round_trip_on_random_scenes():
    rng = np.random.default_rng(0)
    cfg = ShapesConfig(p_size=0.5, p_position=0.5)
    for _ in range(500):
        scene = make_scene(rng, cfg)
        assert parse_caption(caption(scene)) == scene.described()


@pytest.mark.parametrize(
    "text, words",
    [
        ("a pink circle", "colour"),
        ("a red hexagon", "shape"),
        ("a red circle on the left above a blue square", "end"),
        ("a red circle and a blue square", "position"),
        ("a red circle above", "colour"),
        ("a red circle above a blue square on the left", "end"),
        ("", "colour"),
    ],
)
def test_parse_rejects_text_outside_the_grammar(text, words):
    with pytest.raises(ValueError, match=words):
        parse_caption(text)
    with pytest.raises(ValueError, match="string"):
        parse_caption(None)


# ---------------------------------------------------------------- placements


def test_placements_satisfy_the_description():
    rng = np.random.default_rng(3)
    cfg = ShapesConfig(p_size=1.0, p_position=0.8)
    for _ in range(400):
        scene = make_scene(rng, cfg)
        for obj, p in zip(scene.objects, scene.placements):
            assert 0.05 - 1e-9 <= p.x - p.radius and p.x + p.radius <= 0.95 + 1e-9  # margin to the border
            assert 0.05 - 1e-9 <= p.y - p.radius and p.y + p.radius <= 0.95 + 1e-9
            assert (0.115 <= p.radius <= 0.135) if obj.size == "small" else (0.18 <= p.radius <= 0.21)
            # the checker accepts left: x < 0.4, right: x > 0.6, ..., center within 0.15: keep 0.04 clear
            ok = {"left": p.x < 0.36, "right": p.x > 0.64, "top": p.y < 0.36, "bottom": p.y > 0.64,
                  "center": abs(p.x - 0.5) < 0.11 and abs(p.y - 0.5) < 0.11, None: True}[obj.position]
            assert ok, (obj, p)
        if scene.relation:
            a, b = scene.placements
            dx, dy = b.x - a.x, b.y - a.y  # a <relation> b
            main, cross = {"above": (dy, dx), "below": (-dy, dx), "left of": (dx, dy), "right of": (-dx, dy)}[
                scene.relation
            ]
            assert main >= a.radius + b.radius + 0.05 - 1e-9  # bounding boxes apart by the gap
            assert abs(cross) <= 0.5 * main + 1e-9  # clearly more along the relation than across it


def test_two_objects_differ_in_colour_or_shape():
    rng = np.random.default_rng(4)
    for _ in range(300):
        scene = sample_description(rng, ShapesConfig(), n_objects=2)
        a, b = scene.objects
        assert (a.colour, a.shape) != (b.colour, b.shape)


def test_scene_json_round_trip():
    scene = make_scene(np.random.default_rng(5), ShapesConfig(p_two=1.0))
    assert Scene.from_json(scene.to_json()) == scene
    assert json.loads(scene.to_json())["relation"] == scene.relation


def test_scene_validation():
    with pytest.raises(ValueError, match="colour"):
        SceneObject("pink", "circle")
    with pytest.raises(ValueError, match="relation"):
        Scene((SceneObject("red", "circle"), SceneObject("blue", "circle")), "near")
    with pytest.raises(ValueError, match="position"):
        Scene((SceneObject("red", "circle", position="left"), SceneObject("blue", "circle")), "above")
    with pytest.raises(ValueError, match="placements"):
        Scene((SceneObject("red", "circle"),), None, (Placement(0.5, 0.5, 0.1), Placement(0.2, 0.2, 0.1)))
    with pytest.raises(ValueError, match="radius"):
        Placement(0.5, 0.5, 0.0)


# ---------------------------------------------------------------- held-out split


def _canonical(text: str) -> str:
    """Independent canonical form of a caption: no articles, and "b below a" is "a above b"."""
    words = " ".join(w for w in text.split() if w not in ("a", "an"))
    for word, flipped in ((" below ", " above "), (" to the right of ", " to the left of ")):
        if word in words:
            first, second = words.split(word)
            return second + flipped + first
    return words


def test_held_out_prompts_never_appear_in_training():
    rows = (shapes_row(i, ShapesConfig(seed=seed)) for seed in (0, 1) for i in range(600))
    train = {_canonical(r["text"]) for r in rows}
    test_rows = {_canonical(r["text"]) for r in (shapes_row(i, ShapesConfig(split="test")) for i in range(150))}
    prompts = {_canonical(t) for kind in ("single", "relation") for t in prompt_set(kind, 150, seed=3)}
    assert train and test_rows and prompts
    assert not train & test_rows
    assert not train & prompts


def test_held_out_fraction_is_roughly_as_configured():
    rng = np.random.default_rng(6)
    cfg = ShapesConfig(holdout_fraction=0.2)
    held = [is_held_out(sample_description(rng, cfg), cfg) for _ in range(2000)]
    assert 0.15 < np.mean(held) < 0.25


def test_combination_holdout_keeps_pairs_out_of_training():
    cfg = ShapesConfig(holdout="combination", holdout_fraction=0.1)
    reserved = held_out_pairs(cfg)
    assert len(reserved) == 4  # ceil(0.1 * 8 colours * 5 shapes)
    for split, expect in (("train", False), ("test", True)):
        split_cfg = ShapesConfig(holdout="combination", split=split)
        for i in range(150):
            objects = Scene.from_json(shapes_row(i, split_cfg)["objects"]).objects
            assert any(f"{o.colour} {o.shape}" in reserved for o in objects) == expect


def test_prompt_set():
    single, relation = prompt_set("single", 40, seed=1), prompt_set("relation", 40, seed=1)
    assert len(single) == 40 and all(len(parse_caption(t).objects) == 1 for t in single)
    assert all(parse_caption(t).relation is not None for t in relation)
    assert prompt_set("single", 10, seed=1) == single[:10]  # a prefix, seeded
    assert prompt_set("single", 40, seed=2) != single
    with pytest.raises(ValueError, match="kind"):
        prompt_set("pair")


# ---------------------------------------------------------------- dataset


def test_rows_are_deterministic_and_independent_of_n():
    cfg = ShapesConfig(seed=11)
    small, large = shapes_dataset(3, cfg), shapes_dataset(6, cfg)
    for i in range(3):
        assert small[i]["text"] == large[i]["text"]
        assert np.array_equal(np.asarray(small[i]["image"]), np.asarray(large[i]["image"]))
    rows = iter_shapes(cfg, start=4)
    fourth = next(rows)
    assert fourth["text"] == large[4]["text"] and fourth["index"] == 4
    assert np.array_equal(np.asarray(fourth["image"]), np.asarray(large[4]["image"]))
    other = shapes_dataset(6, ShapesConfig(seed=12))
    assert [r["text"] for r in other] != [r["text"] for r in large]


def test_dataset_columns_and_types():
    import datasets

    ds = shapes_dataset(6, ShapesConfig(image_size=64, p_two=0.5, seed=2))
    assert isinstance(ds, datasets.Dataset) and len(ds) == 6
    assert set(ds.column_names) == {"image", "text", "objects", "relation", "n_objects", "index"}
    assert isinstance(ds.features["image"], datasets.Image)
    for i, row in enumerate(ds):
        assert isinstance(row["image"], Image.Image) and row["image"].mode == "RGB" and row["image"].size == (64, 64)
        scene = Scene.from_json(row["objects"])
        assert caption(scene) == row["text"]
        assert row["relation"] == (scene.relation or "") and row["n_objects"] == len(scene.objects)
        assert row["index"] == i
        # the stored image is the scene rendered
        assert np.array_equal(np.asarray(row["image"]), render_array(scene, 64, BG))


def test_iterable_dataset_matches_rows():
    cfg = ShapesConfig(seed=5)
    first = next(iter(shapes_iterable_dataset(cfg)))
    assert first["text"] == shapes_row(0, cfg)["text"]


def test_custom_background_and_vocabulary():
    cfg = ShapesConfig(colours=("red", "blue"), shapes=("circle", "square"), background=(255, 255, 255), p_two=1.0)
    row = shapes_row(0, cfg)
    scene = Scene.from_json(row["objects"])
    assert {o.colour for o in scene.objects} <= {"red", "blue"}
    assert {o.shape for o in scene.objects} <= {"circle", "square"}
    assert tuple(np.asarray(row["image"])[0, 0]) == (255, 255, 255)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(image_size=8), "image_size"),
        (dict(image_size=32.0), "image_size"),
        (dict(p_two=1.5), "p_two"),
        (dict(p_size=-0.1), "p_size"),
        (dict(colours=("pink",)), "colours"),
        (dict(colours=()), "colours"),
        (dict(colours=("red", "red")), "colours"),
        (dict(shapes=("hexagon",)), "shapes"),
        (dict(relations=("near",)), "relations"),
        (dict(colours=("red",), shapes=("circle",)), "two different"),
        (dict(background=(30, 30, 30)), "black"),  # too close to a palette colour
        (dict(background=(0, 0)), "background"),
        (dict(background=(0, 0, 300)), "background"),
        (dict(supersample=0), "supersample"),
        (dict(seed=-1), "seed"),
        (dict(split="val"), "split"),
        (dict(holdout="random"), "holdout"),
        (dict(holdout_fraction=0.0), "holdout_fraction"),
        (dict(holdout_fraction=1.0), "holdout_fraction"),
    ],
)
def test_bad_config_raises(kwargs, words):
    with pytest.raises(ValueError, match=words):
        ShapesConfig(**kwargs)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="n must"):
        shapes_dataset(-1)
    with pytest.raises(ValueError, match="cfg"):
        shapes_dataset(2, cfg={"image_size": 32})
    with pytest.raises(ValueError, match="start"):
        next(iter_shapes(ShapesConfig(), start=-2))
    with pytest.raises(ValueError, match="n_objects"):
        make_scene(np.random.default_rng(0), ShapesConfig(), n_objects=3)


def test_palette_keeps_clear_of_default_background():
    for name, rgb in COLOURS.items():
        assert math.dist(rgb, BG) > 150, name
