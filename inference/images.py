"""Images in and out of the pipeline: PIL <-> tensors, init images and masks, resizing (grids: inference/grid.py).

Conventions (those of diffusers' ``VaeImageProcessor``, so that the same PIL inputs give the same tensors):

    init image   PIL (any mode -> RGB) / path / float tensor (3, H, W) or (1, 3, H, W) in [0, 1]
                 -> (1, 3, H, W) float32 in [-1, 1]:  x / 255 * 2 - 1
    mask         PIL (any mode -> L) / path / float tensor (H, W), (1, H, W) or (1, 1, H, W) in [0, 1]
                 -> (1, 1, H, W) float32 in {0, 1}:  x / 255, then 1 where >= 0.5 (white = generate, black = keep)
    output       decoded (B, 3, H, W) in [-1, 1] -> pixels (B, H, W, 3) float32 in [0, 1]:  (x / 2 + 0.5).clamp(0, 1)
                 -> PIL RGB:  round(pixels * 255) as uint8   (diffusers' output_type "np" and "pil")

The pipeline never resizes silently: an init image or mask of another size than the requested width x height is
an error. ``resize`` is for callers (the command line) that want to fit an image first.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .grid import image_grid  # noqa: F401  (the contact sheet lives in inference/grid.py; re-exported here)

ImageInput = Union[Image.Image, Tensor, str, os.PathLike]
RESIZE_MODES = ("stretch", "crop", "pad")


# ------------------------------------------------------------------------------------------------ inputs


def open_image(image: ImageInput, what: str = "init_image") -> Image.Image | Tensor:
    """A path is opened (and fully read) as a PIL image; PIL images and tensors pass through. ValueError otherwise."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"{what}: no such file: {path}")
        try:
            with Image.open(path) as im:
                im.load()
                return im.copy()
        except Exception as e:  # noqa: BLE001 - PIL raises many types for unreadable files
            raise ValueError(f"{what}: {path} is not a readable image ({e})") from None
    if isinstance(image, (Image.Image, Tensor)):
        return image
    raise ValueError(f"{what}: expected a PIL image, a path or a tensor, got {type(image).__name__}")


def image_size(image: Image.Image | Tensor, what: str = "init_image") -> tuple[int, int]:
    """(width, height) of a PIL image or an image / mask tensor (..., H, W)."""
    if isinstance(image, Image.Image):
        return image.size
    if image.ndim < 2 or image.shape[-1] == 0 or image.shape[-2] == 0:
        raise ValueError(f"{what}: a tensor needs shape (..., H, W) with H, W > 0, got {tuple(image.shape)}")
    return int(image.shape[-1]), int(image.shape[-2])


def check_image_tensor(image: Tensor, what: str = "init_image") -> None:
    """A float (3, H, W) or (1, 3, H, W) tensor with values in [0, 1]."""
    shape = tuple(image.shape)
    if not image.is_floating_point() or not (
        (image.ndim == 3 and shape[0] == 3) or (image.ndim == 4 and shape[:2] == (1, 3))
    ):
        raise ValueError(f"{what}: a tensor must be float with shape (3, H, W) or (1, 3, H, W), got "
                         f"{image.dtype} {shape}")  # fmt: skip
    _check_unit_range(image, what)


def check_mask_tensor(mask: Tensor, what: str = "mask") -> None:
    """A float (H, W), (1, H, W) or (1, 1, H, W) tensor with values in [0, 1]."""
    shape = tuple(mask.shape)
    if not mask.is_floating_point() or mask.ndim not in (2, 3, 4) or any(d != 1 for d in shape[:-2]):
        raise ValueError(f"{what}: a tensor must be float with shape (H, W), (1, H, W) or (1, 1, H, W), got "
                         f"{mask.dtype} {shape}")  # fmt: skip
    _check_unit_range(mask, what)


def _check_unit_range(x: Tensor, what: str) -> None:
    if x.numel() and not (bool(torch.isfinite(x).all()) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0):
        raise ValueError(f"{what}: tensor values must be finite and in [0, 1]")


def image_to_tensor(image: Image.Image | Tensor) -> Tensor:
    """Init image -> (1, 3, H, W) float32 in [-1, 1] (see the module docstring)."""
    if isinstance(image, Image.Image):
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)  # (H, W, 3) in [0, 1]
        x = x.permute(2, 0, 1)[None]
    else:
        check_image_tensor(image)
        x = image.detach().to("cpu", torch.float32).reshape(1, 3, *image.shape[-2:])
    return 2.0 * x - 1.0


def mask_to_tensor(mask: Image.Image | Tensor) -> Tensor:
    """Mask -> (1, 1, H, W) float32, 1 where the image is generated and 0 where it is kept (binarized at 0.5)."""
    if isinstance(mask, Image.Image):
        m = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None, None]  # (1, 1, H, W)
    else:
        check_mask_tensor(mask)
        m = mask.detach().to("cpu", torch.float32).reshape(1, 1, *mask.shape[-2:])
    return (m >= 0.5).to(torch.float32)


def latent_mask(mask: Tensor, height: int, width: int) -> Tensor:
    """(B, 1, H, W) pixel mask -> (B, 1, height, width) latent mask, nearest neighbour (as diffusers' inpainting)."""
    return F.interpolate(mask, size=(height, width))


# ------------------------------------------------------------------------------------------------ outputs


def to_pixels(decoded: Tensor) -> Tensor:
    """VAE output (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) float32 in [0, 1] on the CPU."""
    return (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).to("cpu", torch.float32)


def pixels_to_pil(pixels: Tensor) -> list[Image.Image]:
    """(B, H, W, 3) float in [0, 1] -> B RGB images, each value round(p * 255)."""
    arr = (pixels.numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]  # (H, W, 3) uint8 -> RGB


# ------------------------------------------------------------------------------------------------ helpers


def resize(image: Image.Image, width: int, height: int, mode: str = "crop") -> Image.Image:
    """Fit a PIL image to width x height: ``stretch`` (ignore the aspect ratio), ``crop`` (cover, centre crop) or
    ``pad`` (fit inside, centre, edges filled with black). Lanczos resampling; masks keep their mode."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode: unknown {mode!r}; allowed: {', '.join(RESIZE_MODES)}")
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: must be a positive integer, got {v!r}")
    if image.size == (width, height):
        return image.copy()
    if mode == "stretch":
        return image.resize((width, height), Image.LANCZOS)
    w, h = image.size
    scale = max(width / w, height / h) if mode == "crop" else min(width / w, height / h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    scaled = image.resize((nw, nh), Image.LANCZOS)
    if mode == "crop":
        left, top = (nw - width) // 2, (nh - height) // 2
        return scaled.crop((left, top, left + width, top + height))
    canvas = Image.new(image.mode, (width, height))
    canvas.paste(scaled, ((width - nw) // 2, (height - nh) // 2))
    return canvas
