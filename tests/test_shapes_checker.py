"""The shapes checker (ldm/shapes/checker.py): reading images back into objects and scoring prompts.

Ground truth comes from the generator (the scene that was rendered), never from the checker; images are
perturbed the way a generative model or a file format would (Gaussian noise, blur, JPEG with 4:2:0 chroma).
"""
import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from ldm.shapes import (
    Placement,
    Scene,
    SceneObject,
    ShapesConfig,
    adherence,
    caption,
    detect,
    make_scene,
    render,
    score,
)
from ldm.shapes.checker import components, to_array


def perturb(image: Image.Image, rng: np.random.Generator, noise=8.0, blur=0.6, jpeg=85) -> Image.Image:
    """Blur (Gaussian, sigma in px), add Gaussian noise (sigma in 0..255 units), then JPEG round trip."""
    image = image.filter(ImageFilter.GaussianBlur(blur))
    pixels = np.asarray(image, dtype=np.float64) + rng.normal(0.0, noise, (image.height, image.width, 3))
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=jpeg)  # Pillow's default subsampling: 4:2:0
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def scenes(n, seed, **cfg):
    rng = np.random.default_rng(seed)
    config = ShapesConfig(p_two=0.5, p_size=0.5, p_position=0.5, **cfg)
    return [make_scene(rng, config) for _ in range(n)]


def placed(*objects, relation=None):
    """Scene from (colour, shape, size, position, (x, y, r)) tuples."""
    objs = tuple(SceneObject(c, s, size, pos) for c, s, size, pos, _ in objects)
    return Scene(objs, relation, tuple(Placement(*at) for *_, at in objects))


RED_CIRCLE = placed(("red", "circle", "large", "left", (0.3, 0.5, 0.19)))
RED_ABOVE_BLUE = placed(
    ("red", "circle", None, None, (0.5, 0.28, 0.15)),
    ("blue", "square", None, None, (0.55, 0.72, 0.15)),
    relation="above",
)


# ---------------------------------------------------------------- accuracy


@pytest.mark.parametrize("size", [32, 64])
def test_clean_renders_are_read_back(size):
    batch = scenes(200 if size == 32 else 60, seed=1)
    summary = adherence([caption(s) for s in batch], [render(s, size) for s in batch])
    assert summary["ok"] >= 0.99, summary


@pytest.mark.parametrize("size", [32, 64])
def test_perturbed_renders_are_read_back(size):
    # Gaussian noise sigma 8/255, blur sigma 0.6 px, JPEG quality 85 with 4:2:0 chroma
    rng = np.random.default_rng(2)
    batch = scenes(200 if size == 32 else 60, seed=3)
    images = [perturb(render(s, size), rng) for s in batch]
    summary = adherence([caption(s) for s in batch], images)
    assert summary["ok"] >= 0.98, {k: v for k, v in summary.items() if k != "scores"}
    assert summary["by_kind"]["single"]["colour_shape_ok"] >= 0.98
    assert summary["by_kind"]["relation"]["relation_ok"] >= 0.98


def test_detections_agree_with_the_generator():
    rng = np.random.default_rng(4)
    for scene in scenes(60, seed=5):
        found = detect(perturb(render(scene, 32), rng))
        assert len(found) == len(scene.objects)
        for obj, p in zip(scene.objects, scene.placements):
            (d,) = [d for d in found if (d.colour, d.shape) == (obj.colour, obj.shape)]
            assert abs(d.center[0] - p.x) < 0.02 and abs(d.center[1] - p.y) < 0.02  # < 0.7 px at 32
            assert d.radius == pytest.approx(p.radius, rel=0.1)
            assert d.size == ("large" if p.radius > 0.16 else "small")


def test_other_backgrounds_are_estimated():
    scene = RED_ABOVE_BLUE
    for background in [(255, 255, 255), (200, 200, 200), (170, 190, 150)]:
        image = render(scene, 32, background=background)
        assert score(caption(scene), image)["ok"], background


def test_float_arrays_read_like_images():
    image = render(RED_CIRCLE, 32)
    as_float = np.asarray(image, dtype=np.float32) / 255.0
    (a,), (b,) = detect(as_float), detect(image)
    assert (a.colour, a.shape, a.size) == (b.colour, b.shape, b.size) == ("red", "circle", "large") and a.bbox == b.bbox
    assert a.center == pytest.approx(b.center) and a.area == pytest.approx(b.area)
    assert detect(np.asarray(image)) == detect(image)


# ---------------------------------------------------------------- rejecting mismatches


def test_mismatches_are_rejected():
    image = render(RED_CIRCLE, 32)
    assert score("a large red circle on the left", image)["ok"]
    assert score("a red circle", image)["ok"]
    wrong = {
        "a blue circle": "colour_shape_ok",
        "a red square": "colour_shape_ok",
        "a red diamond": "colour_shape_ok",
        "an orange circle": "colour_shape_ok",
        "a small red circle": "size_ok",
        "a red circle on the right": "position_ok",
        "a red circle at the top": "position_ok",
        "a red circle above a blue square": "count_ok",
    }
    for prompt, check in wrong.items():
        result = score(prompt, image)
        assert result[check] is False and result["ok"] is False, prompt


def test_relation_swaps_are_rejected():
    image = render(RED_ABOVE_BLUE, 32)
    assert score("a red circle above a blue square", image)["ok"]
    assert score("a blue square below a red circle", image)["ok"]
    for prompt in ["a red circle below a blue square", "a blue square above a red circle",
                   "a red circle to the left of a blue square", "a red circle to the right of a blue square"]:
        result = score(prompt, image)
        assert result["colour_shape_ok"] and result["relation_ok"] is False and not result["ok"], prompt
    result = score("a red square above a blue circle", image)  # shapes swapped between the objects
    assert not result["colour_shape_ok"] and result["relation_ok"] is False


def test_relation_between_two_alike_objects():
    twins = placed(("red", "circle", None, None, (0.5, 0.3, 0.15)), ("red", "circle", None, None, (0.5, 0.7, 0.15)),
                   relation="above")
    image = render(twins, 32)
    assert score("a red circle above a red circle", image)["ok"]
    assert score("a red circle to the left of a red circle", image)["relation_ok"] is False


def _mutate(scene: Scene, rng: np.random.Generator) -> Scene:
    """A description that the scene's image does not satisfy: one colour, shape or the relation changed."""
    objects = list(scene.objects)
    i = int(rng.integers(len(objects)))
    choice = rng.integers(3 if scene.relation else 2)
    if choice == 0:
        colour = [c for c in ("red", "green", "blue", "yellow", "purple") if c != objects[i].colour][rng.integers(4)]
        objects[i] = SceneObject(colour, objects[i].shape, objects[i].size, objects[i].position)
    elif choice == 1:
        shapes = [s for s in ("circle", "square", "triangle", "diamond", "cross") if s != objects[i].shape]
        shape = shapes[rng.integers(4)]
        objects[i] = SceneObject(objects[i].colour, shape, objects[i].size, objects[i].position)
    else:
        return Scene(tuple(objects), {"above": "below", "below": "above", "left of": "right of",
                                      "right of": "left of"}[scene.relation])
    return Scene(tuple(objects), scene.relation)


def test_random_mismatches_are_rejected_on_perturbed_images():
    rng, noise = np.random.default_rng(6), np.random.default_rng(7)
    batch = scenes(150, seed=8)
    wrong = [caption(_mutate(s, rng)) for s in batch]
    summary = adherence(wrong, [perturb(render(s, 32), noise) for s in batch])
    assert summary["ok"] <= 0.02, summary["ok"]


def test_blank_and_off_palette_images_have_no_objects():
    assert detect(Image.new("RGB", (32, 32), (240, 240, 240))) == []
    # a pale pink blob is no palette colour (nor half of one over the background): not an object
    image = np.full((32, 32, 3), 240, dtype=np.uint8)
    image[10:22, 10:22] = (255, 150, 200)
    assert detect(image) == []
    result = score("a red square", image)
    assert result["count_ok"] is False and result["ok"] is False


# ---------------------------------------------------------------- summary and helpers


def test_adherence_fractions():
    red_circle, red_above_blue = render(RED_CIRCLE, 32), render(RED_ABOVE_BLUE, 32)
    prompts = ["a red circle", "a blue circle", "a red circle above a blue square", "a red circle below a blue square"]
    summary = adherence(prompts, [red_circle, red_circle, red_above_blue, red_above_blue])
    assert summary["n"] == 4
    assert summary["ok"] == 0.5
    assert summary["colour_shape_ok"] == 0.75
    assert summary["relation_ok"] == 0.5
    assert summary["position_ok"] is None and summary["size_ok"] is None  # no prompt states one
    assert summary["by_kind"]["single"]["colour_shape_ok"] == 0.5
    assert summary["by_kind"]["relation"]["colour_shape_ok"] == 1.0
    assert [s["ok"] for s in summary["scores"]] == [True, False, True, False]


def test_components_are_8_connected():
    mask = np.zeros((6, 6), dtype=bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: one component
    mask[4:6, 3:6] = True
    parts = components(mask)
    assert sorted(int(p.sum()) for p in parts) == [2, 6]
    assert not (parts[0] & parts[1]).any()


def test_bad_inputs_raise():
    image = render(RED_CIRCLE, 32)
    with pytest.raises(ValueError, match="image"):
        to_array(np.zeros((32, 32)))
    with pytest.raises(ValueError, match="image"):
        detect("not an image")
    with pytest.raises(ValueError, match="square"):
        detect(np.zeros((32, 40, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="colours"):
        detect(image, colours=("pink",))
    with pytest.raises(ValueError, match="outside the shapes grammar"):
        score("a photo of a cat", image)
    with pytest.raises(ValueError, match="equal length"):
        adherence(["a red circle"], [image, image])
