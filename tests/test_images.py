"""training/images.py: decoding every mode to RGB, EXIF orientation, bad files, crops, flips, odd sizes.

References are independent of the code under test: hand-computed pixel values, numpy rotations, and PIL's
own resize / crop / transpose / alpha_composite applied step by step.
"""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from training.images import (
    BadImage, check_aspect, keyed_rng, load_image, peek_size, plan_crop, to_tensor, transform_image,
)


def pattern(w: int, h: int, seed: int = 0) -> Image.Image:
    """An RGB image with no symmetry, so rotations, flips and crop offsets all show."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def as_tensor(arr_hw3: np.ndarray) -> torch.Tensor:
    """Hand conversion (H, W, 3) uint8 -> (3, H, W) in [-1, 1]: v / 127.5 - 1."""
    return torch.tensor(arr_hw3, dtype=torch.float64).permute(2, 0, 1) / 127.5 - 1


def rgb_of(im: Image.Image) -> np.ndarray:
    assert im.mode == "RGB"
    return np.asarray(im).astype(np.int64)


# ------------------------------------------------------------------------------------------- modes


def test_to_tensor_range_and_layout():
    arr = np.array([[[0, 255, 128], [10, 20, 30]]], dtype=np.uint8)  # (1, 2, 3)
    t = to_tensor(Image.fromarray(arr, "RGB"))
    assert t.shape == (3, 1, 2) and t.dtype == torch.float32
    assert t[0, 0, 0] == -1 and t[1, 0, 0] == 1
    torch.testing.assert_close(t.double(), as_tensor(arr))


def test_rgba_composited_on_background_matches_alpha_composite_and_hand_formula():
    px = np.array([[[200, 100, 0, 128], [10, 20, 30, 0]], [[50, 60, 70, 255], [255, 255, 255, 64]]], np.uint8)
    im = Image.fromarray(px, "RGBA")
    bg = (0, 0, 255)
    got = load_image(im, background=bg)
    ref = Image.alpha_composite(Image.new("RGBA", im.size, bg + (255,)), im).convert("RGB")
    assert np.array_equal(rgb_of(got), rgb_of(ref))
    a = px[..., 3:4] / 255.0  # Porter-Duff "over" by hand
    hand = px[..., :3] * a + np.array(bg) * (1 - a)
    assert np.abs(rgb_of(got) - hand).max() <= 1
    assert tuple(rgb_of(got)[0, 1]) == bg  # fully transparent: the background, not the hidden colour


def test_la_and_transparent_palette_composited_on_white():
    la = Image.fromarray(np.array([[[100, 128], [0, 0]]], np.uint8), "LA")
    got = rgb_of(load_image(la))
    expect = 100 * 128 / 255 + 255 * (1 - 128 / 255)
    assert np.abs(got[0, 0] - expect).max() <= 1 and tuple(got[0, 1]) == (255, 255, 255)

    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0  # palette entry 0 (red) is transparent
    buf = io.BytesIO()
    p.save(buf, "PNG")
    got = rgb_of(load_image(buf.getvalue(), background=(10, 20, 30)))
    assert tuple(got[0, 0]) == (10, 20, 30) and tuple(got[0, 1]) == (0, 255, 0)


def test_cmyk_i16_and_bilevel_to_rgb():
    cmyk = Image.new("CMYK", (3, 1))
    for x, v in enumerate([(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)]):
        cmyk.putpixel((x, 0), v)
    got = rgb_of(load_image(cmyk))
    assert [tuple(p) for p in got[0]] == [(255, 255, 255), (0, 255, 255), (0, 0, 0)]  # white, cyan, black

    values = np.array([[0, 25700, 65535, 32896]], dtype=np.uint16)  # 25700 = 100 * 257, 32896 = 128 * 257
    i16 = Image.fromarray(values)
    assert i16.mode.startswith("I;16")
    buf = io.BytesIO()
    i16.save(buf, "PNG")  # also through a 16-bit PNG file
    for src in (i16, buf.getvalue()):
        got = rgb_of(load_image(src))
        assert got[0, :, 0].tolist() == [0, 100, 255, 128]  # scaled by 1/257, not clipped at 255
        assert (got[..., 0] == got[..., 2]).all()

    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    assert rgb_of(load_image(bilevel)).tolist() == [[[0, 0, 0], [255, 255, 255]]]


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "CMYK", "I;16", "1", "L", "RGB"])
def test_every_mode_gives_a_3hw_tensor_in_range(mode):
    base = pattern(12, 9)
    im = base.convert(mode) if mode != "I;16" else Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257)
    out = transform_image(load_image(im), (8, 8))
    assert out.pixel_values.shape == (3, 8, 8) and out.pixel_values.dtype == torch.float32
    assert out.pixel_values.min() >= -1 and out.pixel_values.max() <= 1


# ---------------------------------------------------------------------------------------- orientation


def _png_with_exif(im: Image.Image, orientation: int | None = None, raw: bytes | None = None) -> bytes:
    exif = raw
    if orientation is not None:
        e = Image.Exif()
        e[0x0112] = orientation
        exif = e.tobytes()
    buf = io.BytesIO()
    im.save(buf, "PNG", exif=exif)
    return buf.getvalue()


def test_exif_orientation_6_rotates_clockwise(tmp_path):
    im = pattern(5, 3)
    path = tmp_path / "rotated.png"
    path.write_bytes(_png_with_exif(im, orientation=6))
    expected = np.rot90(np.asarray(im), k=-1)  # orientation 6: turn 90 degrees clockwise to view
    got = load_image(str(path))
    assert got.size == (3, 5)
    assert np.array_equal(np.asarray(got), expected)
    assert peek_size(str(path)) == (5, 3)  # (h, w) upright, from the header only


def test_broken_exif_is_tolerated_without_rotation():
    im = pattern(4, 2)
    data = _png_with_exif(im, raw=b"garbage, not a TIFF header")
    got = load_image(data)
    assert np.array_equal(np.asarray(got), np.asarray(im))
    assert peek_size(data) == (2, 4)


# ----------------------------------------------------------------------------------------- bad files


def _bad_files(tmp_path):
    good = io.BytesIO()
    pattern(32, 32).save(good, "PNG")
    files = {
        "zero.png": b"",
        "text.png": b"this is a caption, not an image\n",
        "corrupt.png": bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8)),
        "truncated.png": good.getvalue()[: len(good.getvalue()) // 2],
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return [tmp_path / n for n in files]


def test_bad_files_raise_badimage_naming_the_path(tmp_path):
    for path in _bad_files(tmp_path) + [tmp_path / "missing.png"]:
        with pytest.raises(BadImage) as info:
            load_image(str(path))
        assert info.value.path == str(path) and str(path) in str(info.value)
    with pytest.raises(BadImage, match="row 7"):
        load_image({"bytes": b"junk", "path": None}, name="data.parquet[row 7]")


# ------------------------------------------------------------------------------------------ geometry


def test_center_crop_matches_pil_resize_then_crop():
    im = pattern(60, 30)  # w=60, h=30 -> shorter side 30 -> 20: resized 40x20, centre crop left (40-20)/2 = 10
    out = transform_image(im, (20, 20))
    assert out.original_size == (30, 60) and out.crop_coords == (0, 10) and out.target_size == (20, 20)
    ref = im.resize((40, 20), Image.Resampling.LANCZOS).crop((10, 0, 30, 20))
    torch.testing.assert_close(out.pixel_values.double(), as_tensor(np.asarray(ref)), atol=1e-6, rtol=0)


def test_random_crops_record_their_coordinates():
    im = pattern(30, 45, seed=3)  # w=30, h=45 -> 16 wide: resized 16x24, top in [0, 8]
    resized = im.resize((16, 24), Image.Resampling.LANCZOS)
    tops = set()
    for key in range(12):
        out = transform_image(im, (16, 16), random_crop=True, rng=keyed_rng(0, 0, key))
        top, left = out.crop_coords
        assert left == 0 and 0 <= top <= 8
        tops.add(top)
        ref = resized.crop((left, top, left + 16, top + 16))
        torch.testing.assert_close(out.pixel_values.double(), as_tensor(np.asarray(ref)), atol=1e-6, rtol=0)
    assert len(tops) > 1
    a = transform_image(im, (16, 16), random_crop=True, rng=keyed_rng(5, 2, 9))
    b = transform_image(im, (16, 16), random_crop=True, rng=keyed_rng(5, 2, 9))
    assert a.crop_coords == b.crop_coords and torch.equal(a.pixel_values, b.pixel_values)


def test_no_resize_needed_is_an_exact_crop():
    im = pattern(10, 6)
    out = transform_image(im, (6, 6), random_crop=True, rng=random.Random(1))
    top, left = out.crop_coords
    torch.testing.assert_close(out.pixel_values.double(), as_tensor(np.asarray(im.crop((left, 0, left + 6, 6)))), atol=1e-6, rtol=0)


def test_flip_equals_pil_transpose_and_records_the_flipped_frame():
    im = pattern(40, 20, seed=5)  # no resize for target 20: crops of the 40x20 image itself
    out = transform_image(im, (20, 20), random_crop=True, flip_prob=1.0, rng=random.Random(4))
    assert out.flipped
    top, left = out.crop_coords
    flipped = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    ref = flipped.crop((left, top, left + 20, top + 20))  # crop_coords are in the flipped frame
    torch.testing.assert_close(out.pixel_values.double(), as_tensor(np.asarray(ref)), atol=1e-6, rtol=0)
    plain = transform_image(im, (20, 20), random_crop=True, flip_prob=0.0, rng=random.Random(4))
    assert not plain.flipped and plain.crop_coords == (top, 40 - 20 - left)
    assert torch.equal(out.pixel_values, plain.pixel_values.flip(-1))


def test_plan_crop_cover_sizes():
    assert plan_crop((30, 60), (20, 20), random_crop=False) == ((20, 40), (0, 10))
    assert plan_crop((3, 4), (64, 32), random_crop=False) == ((64, 85), (0, 26))  # 4 * 64/3 = 85.3; (85-32)/2 = 26.5 -> 26


# --------------------------------------------------------------------------------- 1x1 and extreme aspect


def test_one_pixel_image_is_upscaled_to_a_flat_colour():
    out = transform_image(load_image(Image.new("RGB", (1, 1), (255, 0, 51))), (16, 16))
    assert out.pixel_values.shape == (3, 16, 16) and out.original_size == (1, 1)
    expect = torch.tensor([1.0, -1.0, 51 / 127.5 - 1]).view(3, 1, 1).expand(3, 16, 16)
    torch.testing.assert_close(out.pixel_values, expect, atol=1e-6, rtol=0)
    check_aspect((1, 1), 4.0, "one.png")  # not refused


def test_extreme_aspect_is_refused_or_cropped_by_policy():
    with pytest.raises(BadImage, match="max_aspect=4") as info:
        check_aspect((1, 1000), 4.0, "strip.png")
    assert info.value.path == "strip.png"
    check_aspect((1, 4), 4.0, "edge.png")  # exactly at the limit: accepted
    strip = Image.new("RGB", (1000, 1), (0, 255, 0))  # with no limit: upscaled to 16 high, a 16x16 piece kept
    out = transform_image(strip, (16, 16))
    assert out.pixel_values.shape == (3, 16, 16) and out.crop_coords == (0, (16000 - 16) // 2)
    torch.testing.assert_close(out.pixel_values[1], torch.ones(16, 16), atol=1e-6, rtol=0)


def test_long_strip_resamples_only_the_crop_box():
    x = np.linspace(0, 255, 400)  # a smooth 400x2 gradient: 64x larger than the 8x8 target once resized
    im = Image.fromarray(np.repeat(np.stack([x, 255 - x, x / 2], -1)[None], 2, 0).round().astype(np.uint8), "RGB")
    out = transform_image(im, (8, 8), random_crop=True, rng=random.Random(0))
    top, left = out.crop_coords
    assert top == 0 and 0 <= left <= 1600 - 8
    ref = im.resize((1600, 8), Image.Resampling.LANCZOS).crop((left, 0, left + 8, 8))
    assert (out.pixel_values.double() - as_tensor(np.asarray(ref))).abs().max() <= 1.01 / 127.5
