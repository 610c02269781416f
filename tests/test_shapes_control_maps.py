"""Control maps of the shapes dataset (mask, edges) and the placement measure (ldm/shapes/control_maps.py,
ldm/shapes/placement.py).

References are independent of the code under test: pixel sets of grid-aligned squares written out by hand, the
closed-form area of a disc with a counting bound derived below, hand-counted IoUs, scipy.ndimage's morphology
for the outline, and the image itself (its colour distance from the background) for the dataset columns.
"""
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
    binary_mask,
    chance_scores,
    control_eval_set,
    is_held_out,
    make_scene,
    mask_iou,
    object_mask,
    parse_caption,
    placement_scores,
    random_layout_masks,
    render,
    render_edges,
    render_mask,
    shapes_dataset,
    shapes_iterable_dataset,
    shapes_row,
)
from ldm.shapes.render import render_array

BG = (240, 240, 240)


def one(colour, shape, at):
    return Scene((SceneObject(colour, shape),), None, (Placement(*at),))


def box(size, rows, cols):
    out = np.zeros((size, size), dtype=bool)
    out[rows[0] : rows[1], cols[0] : cols[1]] = True
    return out


# ---------------------------------------------------------------- the maps, by hand


def test_grid_aligned_square_mask_and_edges():
    # centre (16, 16) px, half side 8 px: pixels 8..23 fully covered, nothing else
    scene = one("red", "square", (0.5, 0.5, 0.25))
    mask, edges = render_mask(scene, 32), render_edges(scene, 32)
    assert mask.mode == "L" and edges.mode == "L" and mask.size == edges.size == (32, 32)
    inside = box(32, (8, 24), (8, 24))
    assert np.array_equal(np.asarray(mask), np.where(inside, 255, 0))
    # outline band: one pixel outside (rows / cols 7 and 24) and one inside (8 and 23)
    band = box(32, (7, 25), (7, 25)) & ~box(32, (9, 23), (9, 23))
    assert np.array_equal(np.asarray(edges), np.where(band, 255, 0))
    # the mask is aligned with the image: object pixels are exactly the ones not equal to the background
    image = render_array(scene, 32, BG)
    assert np.array_equal((image != BG).any(axis=-1), inside)


def test_half_covered_columns_round_up_into_the_binary_mask():
    # square x in [8.5, 24.5] px, y in [8, 24]: columns 8 and 24 are half covered -> 255 / 2 = 127.5 -> 128
    scene = one("black", "square", (16.5 / 32, 0.5, 8 / 32))
    mask = np.asarray(render_mask(scene, 32)).astype(int)
    expected = np.zeros((32, 32), dtype=int)
    expected[8:24, 9:24] = 255
    expected[8:24, 8] = expected[8:24, 24] = 128
    assert np.array_equal(mask, expected)
    inside = box(32, (8, 24), (8, 25))  # > 127: both half columns count
    assert np.array_equal(binary_mask(scene, 32), inside)
    band = box(32, (7, 25), (7, 26)) & ~box(32, (9, 23), (9, 24))
    assert np.array_equal(np.asarray(render_edges(scene, 32)) == 255, band)
    # and object_mask reads the half columns of the rendered image (132 = halfway, banker's rounding) as object
    assert np.array_equal(object_mask(render(scene, 32)), inside)


def test_disc_mask_area_and_pixels_match_geometry():
    size, s, r_px = 64, 8, 10.5
    cx = cy = 32.0
    mask = np.asarray(render_mask(one("blue", "circle", (cx / size, cy / size, r_px / size)), size, s))
    mask = mask.astype(np.float64) / 255
    # Area. Each sample point stands for its (1/s x 1/s) cell; only cells the circle passes through can be
    # counted wrongly, by at most one cell each. In cell units (rho = r s) each quarter arc is monotone and
    # spans rho cells in x and in y, so it meets at most 2 rho + 3 cells: |count - area| <= 8 rho + 12 cells.
    # uint8 rounding adds at most 0.5 / 255 on each partly covered pixel (<= 8 r + 12 of them, same argument).
    rho = r_px * s
    tolerance = (8 * rho + 12) / s**2 + (8 * r_px + 12) * 0.5 / 255
    assert abs(mask.sum() - math.pi * r_px**2) <= tolerance
    # Pixels: a pixel whose centre is within r - sqrt(2)/2 of the centre lies wholly inside the disc, one whose
    # centre is beyond r + sqrt(2)/2 wholly outside (half a pixel diagonal).
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    d = np.hypot(xs - cx, ys - cy)
    assert (mask[d <= r_px - math.sqrt(0.5)] == 1).all()
    assert (mask[d >= r_px + math.sqrt(0.5)] == 0).all()


def test_edges_are_the_morphological_gradient_of_the_binary_mask():
    ndimage = pytest.importorskip("scipy.ndimage")
    square = np.ones((3, 3), dtype=bool)
    rng = np.random.default_rng(3)
    for _ in range(20):
        scene = make_scene(rng, ShapesConfig(p_two=0.5))
        b = np.asarray(render_mask(scene, 32)) > 127
        reference = ndimage.binary_dilation(b, square) & ~ndimage.binary_erosion(b, square, border_value=1)
        edges = np.asarray(render_edges(scene, 32))
        assert set(np.unique(edges)) <= {0, 255}
        assert np.array_equal(edges == 255, reference)


def test_two_objects_share_one_mask():
    a = Scene((SceneObject("red", "square"), SceneObject("blue", "square")), "left of",
              (Placement(8 / 32, 0.5, 4 / 32), Placement(24 / 32, 0.5, 4 / 32)))
    expected = box(32, (12, 20), (4, 12)) | box(32, (12, 20), (20, 28))
    assert np.array_equal(np.asarray(render_mask(a, 32)), np.where(expected, 255, 0))


def test_maps_need_a_placed_scene_and_valid_size():
    described = Scene((SceneObject("red", "circle"),))
    with pytest.raises(ValueError, match="placements"):
        render_mask(described)
    with pytest.raises(ValueError, match="size"):
        render_edges(one("red", "circle", (0.5, 0.5, 0.2)), size=4)


# ---------------------------------------------------------------- IoU, by hand


def test_mask_iou_hand_counted():
    a, b = box(6, (0, 4), (0, 4)), box(6, (2, 6), (0, 4))  # 16 and 16 pixels, overlapping in 2 x 4 = 8
    assert mask_iou(a, b) == pytest.approx(8 / 24)
    assert mask_iou(a, a) == 1.0
    assert mask_iou(box(6, (0, 2), (0, 2)), box(6, (3, 5), (3, 5))) == 0.0
    empty = np.zeros((6, 6), dtype=bool)
    assert mask_iou(empty, empty) == 1.0  # nothing to place, nothing placed
    assert mask_iou(a, empty) == 0.0 and mask_iou(empty, a) == 0.0
    # a subset: 4 pixels inside 16
    assert mask_iou(box(6, (0, 2), (0, 2)), a) == pytest.approx(4 / 16)


def test_mask_iou_reads_images_and_grey_levels():
    grey = np.zeros((4, 4), dtype=np.uint8)
    grey[0, :2] = (127, 128)  # 127 is background, 128 object (a control mask's binary mask is > 127)
    expected = np.zeros((4, 4), dtype=bool)
    expected[0, 1] = True
    assert mask_iou(Image.fromarray(grey), expected) == 1.0
    assert mask_iou(grey, expected) == 1.0
    assert mask_iou(expected.astype(np.float64) * 0.6, expected) == 1.0
    with pytest.raises(ValueError, match="same shape"):
        mask_iou(np.zeros((4, 4), bool), np.zeros((4, 5), bool))
    with pytest.raises(ValueError, match="2-d"):
        mask_iou(np.zeros((4, 4, 3), bool), np.zeros((4, 4), bool))


# ---------------------------------------------------------------- object_mask on renders


def _scenes(n, seed, size=32):
    rng = np.random.default_rng(seed)
    return [make_scene(rng, ShapesConfig(p_two=0.5, image_size=size)) for _ in range(n)]


def test_object_mask_of_a_render_is_its_binary_mask():
    scenes = _scenes(200, seed=21)
    ious = [mask_iou(object_mask(render(s, 32)), binary_mask(s, 32)) for s in scenes]
    worst = int(np.argmin(ious))
    assert min(ious) >= 0.97, f"IoU {ious[worst]:.3f} for {scenes[worst].to_json()}"
    ious64 = [mask_iou(object_mask(render(s, 64)), binary_mask(s, 64)) for s in scenes[:40]]
    assert min(ious64) >= 0.97


def test_object_mask_survives_mild_noise():
    scenes = _scenes(200, seed=22)
    noise = np.random.default_rng(23)
    ious = []
    for s in scenes:
        image = render_array(s, 32) / 255.0
        noisy = np.clip(image + noise.normal(0.0, 4 / 255, image.shape), 0.0, 1.0)  # float image in [0, 1]
        ious.append(mask_iou(object_mask(noisy), binary_mask(s, 32)))
    # Noise moves a pixel's coverage estimate by about 4 / |colour - background| ~ 0.017, so only pixels covered
    # near one half can flip: a few rim pixels, which on the smallest objects (~33 px) cost a few hundredths.
    assert np.mean(ious) >= 0.95, f"mean IoU {np.mean(ious):.3f}"
    worst = int(np.argmin(ious))
    assert min(ious) >= 0.8, f"IoU {ious[worst]:.3f} for {scenes[worst].to_json()}"


def test_object_mask_on_other_backgrounds_and_blank_images():
    cfg = ShapesConfig(background=(255, 255, 255), p_two=1.0)
    for s in _scenes(10, seed=24):
        image = render(s, 32, cfg.background)
        assert mask_iou(object_mask(image), binary_mask(s, 32)) >= 0.97  # background estimated from the border
        assert mask_iou(object_mask(image, background=cfg.background), binary_mask(s, 32)) >= 0.97
    blank = np.full((32, 32, 3), 240, dtype=np.uint8)
    assert not object_mask(blank).any()
    speck = blank.copy()
    speck[5, 5] = (25, 25, 25)  # one dark pixel: below min_area (0.6% of 1024 px), dropped unless min_area=0
    assert not object_mask(speck).any() and object_mask(speck, min_area=0).sum() == 1
    with pytest.raises(ValueError, match="colours"):
        object_mask(blank, colours=("pink",))
    with pytest.raises(ValueError, match="threshold"):
        object_mask(blank, threshold=0.0)


def test_placement_scores_pair_images_with_targets():
    scenes = _scenes(6, seed=25)
    images = [render(s, 32) for s in scenes]
    targets = [render_mask(s, 32) for s in scenes]
    assert all(v >= 0.97 for v in placement_scores(images, targets))
    shifted = placement_scores(images, targets[1:] + targets[:1])
    assert np.mean(shifted) < 0.5
    with pytest.raises(ValueError, match="equal length"):
        placement_scores(images, targets[:2])


# ---------------------------------------------------------------- chance level and the evaluation set


def test_different_scenes_overlap_little():
    a, b = _scenes(200, seed=26), _scenes(200, seed=27)
    ious = [mask_iou(binary_mask(x, 32), binary_mask(y, 32)) for x, y in zip(a, b)]
    # the acceptance asks IoU > 0.5 with the control; independent layouts must fall well short of that
    assert np.mean(ious) < 0.5, f"chance IoU of independent scenes {np.mean(ious):.3f}"
    hits = np.mean(np.array(ious) > 0.5)
    assert hits < 0.5, f"independent scenes with IoU > 0.5: {hits:.1%} (mean IoU {np.mean(ious):.3f})"


@pytest.mark.parametrize("kind, n_objects", [("single", 1), ("relation", 2)])
def test_control_eval_set(kind, n_objects):
    cfg = ShapesConfig(image_size=32)
    examples = control_eval_set(40, seed=0, cfg=cfg, kind=kind)
    assert len(examples) == 40
    for prompt, mask, edges, scene in examples:
        assert len(scene.objects) == n_objects and is_held_out(scene, cfg)
        assert parse_caption(prompt) == scene.described()
        assert mask.mode == edges.mode == "L" and mask.size == (32, 32)
        assert np.array_equal(np.asarray(mask), np.asarray(render_mask(scene, 32)))
        assert np.array_equal(np.asarray(edges), np.asarray(render_edges(scene, 32)))
    # a longer list starts with a shorter one; another seed gives other scenes
    assert [e.prompt for e in control_eval_set(10, 0, cfg, kind)] == [e.prompt for e in examples[:10]]
    assert [e.scene for e in control_eval_set(10, 1, cfg, kind)] != [e.scene for e in examples[:10]]

    layouts = random_layout_masks(40, seed=0, cfg=cfg, kind=kind)
    assert len(layouts) == 40 and all(m.dtype == bool and m.shape == (32, 32) for m in layouts)
    chance = chance_scores(40, seed=0, cfg=cfg, kind=kind)
    assert chance == [mask_iou(m, e.mask) for m, e in zip(layouts, examples)]
    hits = np.mean(np.array(chance) > 0.5)
    assert hits < 0.5, f"{kind}: re-placed prompts with IoU > 0.5: {hits:.1%} (mean IoU {np.mean(chance):.3f})"


def test_control_eval_set_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        control_eval_set(2, kind="pair")
    with pytest.raises(ValueError, match="n must"):
        control_eval_set(-1)
    with pytest.raises(ValueError, match="cfg"):
        random_layout_masks(2, cfg={"image_size": 32})


# ---------------------------------------------------------------- dataset columns


def test_map_columns_only_when_asked():
    import datasets

    plain = shapes_dataset(2, ShapesConfig(seed=4))
    assert set(plain.column_names) == {"image", "text", "objects", "relation", "n_objects", "index"}
    assert set(shapes_row(0, ShapesConfig(seed=4))) == set(plain.column_names)
    both = shapes_dataset(2, ShapesConfig(seed=4, control_maps=["edges", "mask"]))
    assert set(both.column_names) == set(plain.column_names) | {"mask", "edges"}
    assert isinstance(both.features["mask"], datasets.Image) and isinstance(both.features["edges"], datasets.Image)
    only = shapes_dataset(2, ShapesConfig(seed=4, control_maps="mask"))
    assert "mask" in only.column_names and "edges" not in only.column_names
    # asking for maps changes no image nor caption
    for i in range(2):
        assert both[i]["text"] == plain[i]["text"]
        assert np.array_equal(np.asarray(both[i]["image"]), np.asarray(plain[i]["image"]))


def _reference_mask(image: np.ndarray, scene: Scene, size: int) -> np.ndarray:
    """Object pixels from the image alone: a pixel belongs to the object whose centre is nearest, and is in when
    its colour lies at least half way from the background to that object's colour. Coverage comes in steps of
    1/16 (supersample 4) and uint8 rounding moves the ratio by < 0.01, so 0.49 splits 8/16 from 7/16."""
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    centres = [(p.x * size, p.y * size) for p in scene.placements]
    nearest = np.argmin([np.hypot(xs - cx, ys - cy) for cx, cy in centres], axis=0)
    far = np.linalg.norm(image.astype(np.float64) - BG, axis=-1)
    full = np.array([math.dist(COLOURS[o.colour], BG) for o in scene.objects])[nearest]
    return far >= 0.49 * full


def test_map_columns_are_aligned_with_the_image():
    cfg = ShapesConfig(seed=6, p_two=0.5, control_maps=("mask", "edges"))
    ds = shapes_dataset(12, cfg)
    for row in ds:
        scene = Scene.from_json(row["objects"])
        image = np.asarray(row["image"])
        mask, edges = np.asarray(row["mask"]), np.asarray(row["edges"])
        assert row["mask"].mode == "L" and mask.shape == image.shape[:2]
        assert np.array_equal(mask > 127, _reference_mask(image, scene, 32))
        assert np.array_equal((mask > 0), (image != BG).any(axis=-1))  # every touched pixel, and only those
        assert edges[mask > 127].any() and edges[mask == 0].any()  # the band straddles the outline


def test_map_columns_are_deterministic_by_seed():
    cfg = ShapesConfig(seed=8, control_maps=("mask", "edges"), image_size=64)
    a, b = shapes_row(3, cfg), shapes_row(3, cfg)
    for name in ("mask", "edges"):
        assert np.array_equal(np.asarray(a[name]), np.asarray(b[name]))
        assert a[name].size == (64, 64)
    other = shapes_row(3, ShapesConfig(seed=9, control_maps=("mask",), image_size=64))
    assert not np.array_equal(np.asarray(other["mask"]), np.asarray(a["mask"]))
    first = next(iter(shapes_iterable_dataset(cfg)))
    assert np.array_equal(np.asarray(first["mask"]), np.asarray(shapes_row(0, cfg)["mask"]))


@pytest.mark.parametrize("value", [("depth",), ("mask", "mask"), 3, ["mask", None]])
def test_bad_control_maps_raise(value):
    with pytest.raises(ValueError, match="control_maps"):
        ShapesConfig(control_maps=value)


def test_control_maps_config_is_normalised():
    assert ShapesConfig().control_maps == ()
    assert ShapesConfig(control_maps="edges").control_maps == ("edges",)
    assert ShapesConfig(control_maps=["edges", "mask"]).control_maps == ("mask", "edges")  # column order
    assert ShapesConfig(control_maps=("mask",)).to_dict()["control_maps"] == ["mask"]
