"""Images for training: decode any stored form to RGB, then resize, crop, flip and turn into a tensor.

    im = load_image(row["image"], background=(255, 255, 255))      # PIL RGB, EXIF orientation applied
    t = transform_image(im, (512, 512), random_crop=True, flip_prob=0.5, rng=random.Random(key))
    t.pixel_values                                                   # (3, 512, 512) float32 in [-1, 1]

What ``load_image`` accepts: a PIL image, encoded bytes, a ``datasets.Image(decode=False)`` dict
``{"bytes", "path"}``, or a path. A file that cannot be decoded (corrupt, truncated, zero bytes, text named
.png, missing, a decompression bomb) raises ``BadImage`` naming it; the dataset wrapper skips and logs it.
Decompression bombs: an image whose header declares more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (PIL's default,
89,478,485: about 9459 x 9459; set it to None to lift the limit) is refused from its header alone, before any pixel
buffer is allocated. PIL itself only warns between 1x and 2x that limit and would decode such an image.

Mode policy (``to_rgb``):
- transparency (RGBA, LA, PA, premultiplied RGBa / La, P or L or RGB with a ``transparency`` entry) is
  alpha-composited over ``background`` (Porter-Duff "over"), never dropped: a transparent emoji on white,
  not on whatever colour its invisible pixels happen to hold;
- 16-bit greyscale (I;16, I;16B, I;16L, and I, read as 16-bit) is scaled to 8 bits with v / 257, rounded,
  so 65535 -> 255 (PIL's own convert clips it to 255 from 255 upwards); F is read as [0, 1] where its
  maximum is <= 1, else as [0, 255];
- CMYK, 1, L, P, YCbCr ... go through PIL's convert("RGB") (no ICC colour management).

Geometry policy (``transform_image``): scale so the image covers the target (h, w) (for a square target:
shorter side to the target), upscaling small images, LANCZOS (antialiased when reducing); then crop
to the target, centred (torchvision's rounding) or at a random offset; then maybe flip horizontally.
A 1x1 image becomes a flat colour. Very elongated images are refused by ``check_aspect`` (max_aspect in
DataConfig) before any of this. Where the resized image would exceed ``FULL_RESIZE_LIMIT`` times the target
area (aspect ratios far beyond the default max_aspect), only the crop box is resampled
(``Image.resize(box=...)``): the same filter, but PIL may then run its two 8-bit passes in the other order,
so pixels can differ from resize-then-crop by the intermediate rounding; the memory stays bounded.

Micro-conditioning (SDXL, Podell et al. 2023, sec. 2.2): ``original_size`` is the (h, w) after EXIF
orientation and before any resize; ``crop_coords`` is the (top, left) of the crop in the resized image,
in the frame of the output: a flipped sample is recorded as if the resized image had been flipped and
then cropped, so ``left`` counts the pixels cut off the output's left edge.
"""
from __future__ import annotations

import io
import os
import random
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image

__all__ = [
    "BadImage", "TransformedImage", "check_aspect", "describe", "exif_orientation", "keyed_rng", "load_image",
    "peek_size",
    "plan_crop", "to_rgb", "to_tensor", "transform_image",
]

RESAMPLE = Image.Resampling.LANCZOS
FULL_RESIZE_LIMIT = 16  # resize the whole image, then crop, while it has at most 16x the target's pixels
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# EXIF 2.3 tag 0x0112 (Orientation): how to turn the stored pixels upright. 5..8 swap width and height.
ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class BadImage(ValueError):
    """An image that cannot be used; ``path`` names it (a file, or 'source[row i]'), ``reason`` says why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


# ---------------------------------------------------------------------------------------------- decoding


def describe(obj: Any, fallback: str = "<image>") -> str:
    """A name for ``obj`` in messages: its path where it has one, else ``fallback``."""
    if isinstance(obj, (str, os.PathLike)):
        return os.fspath(obj)
    if isinstance(obj, dict) and obj.get("path"):
        return str(obj["path"])
    if isinstance(obj, Image.Image) and getattr(obj, "filename", ""):
        return str(obj.filename)
    return fallback


def _source(obj: Any, name: str) -> Any:
    """What Image.open takes (a path or a file object), from any accepted form of ``obj``."""
    if isinstance(obj, dict):
        if obj.get("bytes") is not None:
            obj = obj["bytes"]
        elif obj.get("path"):
            obj = obj["path"]
        else:
            raise BadImage(name, "image dict has neither 'bytes' nor 'path'")
    if isinstance(obj, (bytes, bytearray, memoryview)):
        if len(obj) == 0:
            raise BadImage(name, "empty image bytes")
        return io.BytesIO(bytes(obj))
    if isinstance(obj, (str, os.PathLike)):
        path = os.fspath(obj)
        if not os.path.isfile(path):
            raise BadImage(name, "no such file")
        if os.path.getsize(path) == 0:
            raise BadImage(name, "zero-byte file")
        return path
    raise BadImage(name, f"cannot read an image from a {type(obj).__name__} (expected PIL image, bytes, dict or path)")


def exif_orientation(im: Image.Image, header_only: bool = False) -> int:
    """EXIF / XMP orientation 1..8 of ``im``; 1 where it is missing or unreadable (broken EXIF is tolerated).

    ``header_only`` reads only metadata already parsed from the header (PNG's ``getexif`` would otherwise
    decode all pixels to look for an eXIf chunk after the image data).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Corrupt EXIF data": the value is then simply absent
            exif = Image.Image.getexif(im) if header_only else im.getexif()
            value = int(exif.get(ExifTags.Base.Orientation, 1))
    except Exception:  # noqa: BLE001 - any malformed EXIF / XMP: keep the pixels as stored
        return 1
    return value if value in ORIENTATION_TRANSPOSE else 1


def to_rgb(im: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """``im`` in mode RGB (a new image); see the module docstring for the policy of each mode."""
    if im.mode in ALPHA_MODES or (im.mode in ("P", "L", "RGB") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        base = Image.new("RGBA", im.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if im.mode in SIXTEEN_BIT_MODES:
        v = np.asarray(im).astype(np.int64)  # (H, W), the 16-bit values whatever their byte order
        grey = ((np.clip(v, 0, 65535) + 128) // 257).astype(np.uint8)  # round(v / 257): 65535 -> 255
        return Image.fromarray(grey, "L").convert("RGB")
    if im.mode == "F":
        v = np.asarray(im, dtype=np.float64)
        v = np.nan_to_num(v, nan=0.0, posinf=255.0, neginf=0.0)
        scale = 255.0 if v.size and v.max() <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(v * scale), 0, 255).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


def load_image(obj: Any, background: tuple[int, int, int] = (255, 255, 255), name: str | None = None) -> Image.Image:
    """Decode ``obj`` (PIL image, bytes, {'bytes', 'path'} dict or path) to an upright RGB PIL image.

    Raises BadImage (naming ``name``, else the path of ``obj``) if it cannot be decoded.
    """
    name = name or describe(obj)
    if isinstance(obj, Image.Image):
        return _upright_rgb(obj, background, name)
    src = _source(obj, name)
    try:
        with _open(src) as im:
            return _upright_rgb(im, background, name)
    except BadImage:
        raise
    except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError, struct.error ...
        raise BadImage(name, _reason(e)) from e


def _open(src: Any) -> Image.Image:
    """Image.open without PIL's DecompressionBombWarning: ``_check_pixels`` refuses those images instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(src)


def _check_pixels(im: Image.Image, name: str) -> None:
    """Refuse an image with more pixels than PIL.Image.MAX_IMAGE_PIXELS, from its header (nothing decoded)."""
    limit = Image.MAX_IMAGE_PIXELS
    w, h = im.size
    if limit is not None and w * h > limit:
        raise BadImage(name, f"{w}x{h} = {w * h:,} pixels exceeds PIL.Image.MAX_IMAGE_PIXELS = {limit:,} "
                             f"(a decompression bomb?); not decoded")  # fmt: skip


def _upright_rgb(im: Image.Image, background: tuple[int, int, int], name: str) -> Image.Image:
    _check_pixels(im, name)
    try:
        im.load()  # decode now, so a truncated file fails here and not somewhere later
    except Exception as e:  # noqa: BLE001
        raise BadImage(name, _reason(e)) from e
    method = ORIENTATION_TRANSPOSE.get(exif_orientation(im))
    rgb = to_rgb(im, background)  # always a new image, so the source file may be closed
    return rgb.transpose(method) if method is not None else rgb


def _reason(e: BaseException) -> str:
    if isinstance(e, Image.UnidentifiedImageError):
        return "not a recognised image format"
    if isinstance(e, Image.DecompressionBombError):  # PIL's own refusal, beyond twice MAX_IMAGE_PIXELS
        return f"{e} Not decoded"
    return f"cannot decode ({type(e).__name__}: {e})"


def peek_size(obj: Any, name: str | None = None) -> tuple[int, int]:
    """(height, width) of the upright image, read from the file header without decoding pixels."""
    name = name or describe(obj)
    if isinstance(obj, Image.Image):
        h, w = obj.height, obj.width
        return (w, h) if exif_orientation(obj, header_only=True) >= 5 else (h, w)
    src = _source(obj, name)
    try:
        with _open(src) as im:
            _check_pixels(im, name)
            w, h = im.size
            swap = exif_orientation(im, header_only=True) >= 5
    except BadImage:
        raise
    except Exception as e:  # noqa: BLE001
        raise BadImage(name, _reason(e)) from e
    if w < 1 or h < 1:
        raise BadImage(name, f"empty image ({w}x{h})")
    return (w, h) if swap else (h, w)


def check_aspect(size_hw: tuple[int, int], max_aspect: float | None, name: str) -> None:
    """Refuse (BadImage) an image whose long side is more than ``max_aspect`` times its short side."""
    h, w = size_hw
    if h < 1 or w < 1:
        raise BadImage(name, f"empty image ({w}x{h})")
    if max_aspect is not None and max(h, w) / min(h, w) > max_aspect:
        raise BadImage(
            name, f"aspect ratio {max(h, w) / min(h, w):.3g}:1 ({w}x{h}) exceeds data.max_aspect={max_aspect:g}"
        )


# -------------------------------------------------------------------------------------------- geometry


@dataclass
class TransformedImage:
    pixel_values: torch.Tensor  # (3, H, W) float32 in [-1, 1]
    original_size: tuple[int, int]  # (h, w) of the upright source image
    crop_coords: tuple[int, int]  # (top, left) in the resized image, in the output's (possibly flipped) frame
    target_size: tuple[int, int]  # (h, w) == (H, W)
    flipped: bool


def plan_crop(size_hw: tuple[int, int], target_hw: tuple[int, int], random_crop: bool,
              rng: random.Random | None = None) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized_h, resized_w), (top, left)): the cover-resize size and the crop offset within it."""
    h, w = size_hw
    th, tw = target_hw
    scale = max(th / h, tw / w)  # cover: both sides reach the target
    rh, rw = max(th, round(h * scale)), max(tw, round(w * scale))
    if random_crop:
        rng = rng or random.Random()
        top, left = rng.randint(0, rh - th), rng.randint(0, rw - tw)
    else:  # torchvision CenterCrop's rounding
        top, left = int(round((rh - th) / 2.0)), int(round((rw - tw) / 2.0))
    return (rh, rw), (top, left)


def transform_image(im: Image.Image, target_hw: tuple[int, int], *, random_crop: bool = False,
                    flip_prob: float = 0.0, rng: random.Random | None = None) -> TransformedImage:
    """Cover-resize, crop and maybe flip an RGB image to ``target_hw``; see the module docstring."""
    if im.mode != "RGB":
        raise ValueError(f"transform_image: expected an RGB image (use load_image), got mode {im.mode!r}")
    rng = rng or random.Random()
    th, tw = target_hw
    w, h = im.size
    (rh, rw), (top, left) = plan_crop((h, w), (th, tw), random_crop, rng)
    if (rh, rw) == (h, w):
        out = im.crop((left, top, left + tw, top + th))
    elif rh * rw <= FULL_RESIZE_LIMIT * th * tw:
        out = im.resize((rw, rh), RESAMPLE).crop((left, top, left + tw, top + th))
    else:  # a long strip: resample only the crop box, given in source coordinates
        sx, sy = w / rw, h / rh
        out = im.resize((tw, th), RESAMPLE, box=(left * sx, top * sy, (left + tw) * sx, (top + th) * sy))
    flipped = flip_prob > 0 and rng.random() < flip_prob
    if flipped:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = rw - tw - left  # the offset as seen in the flipped frame
    return TransformedImage(to_tensor(out), (h, w), (top, left), (th, tw), bool(flipped))


def to_tensor(im: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1] (0 -> -1, 255 -> 1)."""
    arr = np.array(im.convert("RGB"), dtype=np.uint8)  # (H, W, 3), a writable copy
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous().float().div_(127.5).sub_(1.0)


def keyed_rng(*key: Any) -> random.Random:
    """A Random seeded from ``key`` (e.g. (seed, epoch, index)): the same draws in every process and run."""
    return random.Random("/".join(map(str, key)))  # str seeds are hashed with SHA-512, not PYTHONHASHSEED

