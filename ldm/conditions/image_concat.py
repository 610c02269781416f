"""``image_concat``: an image concatenated to the latent as extra input channels (inpainting's masked image and
mask, a low-resolution image for upscaling, a depth map; InstructPix2Pix's input image).

    encode: vae      the frozen VAE's latent of the image (scaled mean; latent_channels channels), as
                     InstructPix2Pix and SD's inpainting / depth models feed their image
    encode: resize   the pixels resized to the latent's size (area average): ``channels`` 3 (RGB in [-1, 1]) or
                     1 (the mean of R, G, B: masks and depth maps)

The U-Net's in_channels grow by the channels. "No image" is zeros (InstructPix2Pix's unconditional image).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Condition, Env, register


@dataclass
class ImageConcatArgs:
    encode: str = "resize"  # resize | vae
    channels: int = 3  # encode=resize: 3 (RGB) or 1 (grey)

    def __post_init__(self) -> None:
        if self.encode not in ("resize", "vae"):
            raise ValueError(f"encode: resize or vae, got {self.encode!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels: 1 or 3, got {self.channels!r}")


@register("image_concat")
class ImageConcat(Condition):
    enters = "concat"
    value = "image"
    Args = ImageConcatArgs

    @classmethod
    def width(cls, spec, model) -> int:
        a = cls.parse_args(spec)
        return model.vae.latent_channels if a.encode == "vae" else a.channels

    @torch.no_grad()
    def prepare(self, value, env: Env) -> Tensor:
        image = check_image(value, self.spec.where)  # (B, 3, H, W) in [-1, 1]
        h, w = env.latent_hw
        if self.args.encode == "vae":
            if env.vae is None:
                raise ValueError(f"{self.spec.where}: encode=vae needs the model's VAE")
            vae_dtype = next(env.vae.parameters()).dtype
            mean, _ = env.vae.moments(image.to(env.device, vae_dtype))
            z = env.vae.scale_latent(mean)  # (B, C, h, w)
            if tuple(z.shape[-2:]) != (h, w):
                raise ValueError(f"{self.spec.where}: the image gives a {tuple(z.shape[-2:])} latent, the sample is "
                                 f"{(h, w)}; give an image of the generated size")  # fmt: skip
            return z.float()
        x = image.to(env.device, torch.float32)
        if self.args.channels == 1:
            x = x.mean(dim=1, keepdim=True)  # (B, 1, H, W)
        return F.interpolate(x, size=(h, w), mode="area") if tuple(x.shape[-2:]) != (h, w) else x


def check_image(value, where: str) -> Tensor:
    """(B, 3, H, W) float in [-1, 1], or a ValueError naming the condition."""
    if not isinstance(value, Tensor) or value.ndim != 4 or value.shape[1] != 3 or not value.is_floating_point():
        got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{where}: expected images as a float tensor (B, 3, H, W) in [-1, 1], got {got}")
    return value
