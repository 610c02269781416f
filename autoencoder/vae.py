"""The KL-regularized autoencoder of Stable Diffusion ("KL-f8", Rombach et al. 2022, sec. 3 and appendix G).

    image (B, 3, H, W) in [-1, 1]  --encoder, quant_conv-->  moments (B, 2z, H/f, W/f) = (mean, logvar)
    z = mean + exp(logvar / 2) * eps        (reparametrized posterior sample; z = mean when sample=False)
    latent = (z - shift_factor) * scale_factor                 <- the ONLY place the scale factor is applied
    image = decoder(post_quant_conv(latent / scale_factor + shift_factor))

``scale_factor`` makes the latents roughly unit-variance for the diffusion model: 0.18215 for SD 1.x / 2.x
(the ``scale_factor`` of the original configs), 0.13025 for SDXL. ``shift_factor`` is 0 for those
(SD3 / Flux style VAEs use a shift and no quant convs: ``use_quant_conv=False``).

Half-precision safety: the SD 1.x/XL decoders are known to overflow in float16 on some latents. ``decode``
checks its output; a non-finite result from a reduced-precision run is recomputed in float32 (with a
warning), and a result that is still non-finite raises ``NonFiniteOutputError`` instead of returning NaN.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ldm.vae_config import AutoencoderConfig

from autoencoder.blocks import Decoder, Encoder
from autoencoder.tiling import decode_tiled, moments_tiled

LOGVAR_RANGE = (-30.0, 20.0)  # clamp of the original DiagonalGaussianDistribution
REDUCED_DTYPES = (torch.float16, torch.bfloat16)


class NonFiniteOutputError(RuntimeError):
    """The autoencoder produced NaN or inf even in float32."""


class AutoencoderKL(nn.Module):
    """Encoder + decoder of a KL autoencoder with the original LDM parameter names (see blocks.py)."""

    def __init__(self, config: AutoencoderConfig | None = None):
        super().__init__()
        self.config = c = config if config is not None else AutoencoderConfig()
        if not isinstance(c, AutoencoderConfig):
            raise ValueError(f"config must be an AutoencoderConfig, got {type(c).__name__}")
        z = c.latent_channels
        self.encoder = Encoder(c.in_channels, z, c.base_channels, c.channel_mult, c.num_res_blocks, c.norm_num_groups)
        self.decoder = Decoder(c.out_channels, z, c.base_channels, c.channel_mult, c.num_res_blocks, c.norm_num_groups)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1) if c.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(z, z, 1) if c.use_quant_conv else None

    # ------------------------------------------------------------------------------------ encode

    def moments(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """(B, Cin, H, W) image in [-1, 1] -> unscaled posterior (mean, logvar), each (B, z, H/f, W/f)."""
        self._check_image(image)
        h = self.encoder(image)  # (B, 2z, H/f, W/f)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def encode(
        self,
        image: Tensor,
        sample: bool = True,
        generator: torch.Generator | list[torch.Generator] | None = None,
        tile: int | None = None,
        tile_overlap: int = 128,
    ) -> Tensor:
        """(B, Cin, H, W) image in [-1, 1] -> scaled latent (B, z, H/f, W/f) for the diffusion model.

        sample: draw z ~ N(mean, exp(logvar)) (training); False returns the mean (deterministic).
        generator: one torch.Generator, or a list with one per batch row (row i drawn from generator[i]
            alone, like diffusers' ``randn_tensor``), so a row's latent does not depend on the batch size.
        tile: encode in overlapping tiles of ``tile`` pixels (see tiling.py) to bound memory.
        """
        if tile is None:
            mean, logvar = self.moments(image)
        else:
            mean, logvar = moments_tiled(self, image, tile=tile, overlap=tile_overlap)
        z = sample_posterior(mean, logvar, generator) if sample else mean
        return self.scale_latent(z)

    # ------------------------------------------------------------------------------------ decode

    def decode(self, latent: Tensor, tile: int | None = None, tile_overlap: int = 16) -> Tensor:
        """Scaled latent (B, z, h, w) -> image (B, Cout, h*f, w*f), nominally in [-1, 1] (not clamped).

        tile: decode in overlapping tiles of ``tile`` latent pixels (see tiling.py) to bound memory.
        Never returns NaN/inf: see the module docstring.
        """
        self._check_latent(latent)
        if tile is not None:
            return decode_tiled(self, latent, tile=tile, overlap=tile_overlap)
        z = self.unscale_latent(latent)
        image = self._decode_z(z)
        if bool(torch.isfinite(image).all()):
            return image
        return self._decode_again_in_float32(latent, image.dtype)

    def _decode_z(self, z: Tensor) -> Tensor:
        """Unscaled z (B, z, h, w) -> image (B, Cout, h*f, w*f)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def _decode_again_in_float32(self, latent: Tensor, out_dtype: torch.dtype) -> Tensor:
        """The NaN guard: recompute a non-finite reduced-precision decode with float32 copies of the weights."""
        z = self.unscale_latent(latent.float())  # the whole retry in float32, unscaling included
        params = {n: p for n, p in self.named_parameters() if n.startswith(("decoder.", "post_quant_conv."))}
        reduced = (
            latent.dtype in REDUCED_DTYPES
            or out_dtype in REDUCED_DTYPES
            or any(p.dtype in REDUCED_DTYPES for p in params.values())
            or torch.is_autocast_enabled(z.device.type)
        )
        if reduced:
            warnings.warn(
                f"VAE decode in {out_dtype} produced NaN/inf; decoding again in float32 "
                "(a VAE fine-tuned for float16 avoids this cost)",
                RuntimeWarning,
                stacklevel=3,
            )
            # Temporary upcast by functional call on float32 copies: the module itself is never modified.
            fp32 = {n: p.float() for n, p in params.items()}
            with torch.autocast(device_type=z.device.type, enabled=False):
                if self.post_quant_conv is not None:
                    z = functional_call(self.post_quant_conv, _strip(fp32, "post_quant_conv."), (z,))
                image = functional_call(self.decoder, _strip(fp32, "decoder."), (z,)).to(out_dtype)
            if bool(torch.isfinite(image).all()):
                return image
        bad_in = int((~torch.isfinite(latent)).sum())
        if bad_in:
            raise ValueError(f"latent contains {bad_in} NaN/inf values; decode needs a finite latent")
        raise NonFiniteOutputError(
            f"VAE decode produced NaN/inf {'even in float32 ' if reduced else ''}from a finite latent "
            f"(max |latent| = {float(latent.abs().max()):.4g}); the weights or the latent are broken"
        )

    # ------------------------------------------------------------------------------------ scaling

    def scale_latent(self, z: Tensor) -> Tensor:
        """Unscaled VAE space -> diffusion latent space: (z - shift) * scale."""
        if self.config.shift_factor != 0.0:
            z = z - self.config.shift_factor
        return z * self.config.scale_factor

    def unscale_latent(self, latent: Tensor) -> Tensor:
        """Diffusion latent space -> VAE space: latent / scale + shift (division, as the reference pipelines)."""
        z = latent / self.config.scale_factor
        if self.config.shift_factor != 0.0:
            z = z + self.config.shift_factor
        return z

    # ------------------------------------------------------------------------------------ checks

    def _check_image(self, image: Tensor) -> None:
        c, f = self.config, self.config.downsample_factor
        if not isinstance(image, Tensor) or image.ndim != 4:
            raise ValueError(f"image must be a (B, {c.in_channels}, H, W) tensor, got {_describe(image)}")
        B, C, H, W = image.shape
        if C != c.in_channels:
            raise ValueError(f"image must have {c.in_channels} channels (dim 1), got shape {tuple(image.shape)}")
        if H % f or W % f or H == 0 or W == 0:
            raise ValueError(
                f"image height and width must be positive multiples of the downsampling factor {f}, got {H}x{W}"
            )

    def _check_latent(self, latent: Tensor) -> None:
        c = self.config
        if not isinstance(latent, Tensor) or latent.ndim != 4:
            raise ValueError(f"latent must be a (B, {c.latent_channels}, h, w) tensor, got {_describe(latent)}")
        if latent.shape[1] != c.latent_channels or latent.shape[2] == 0 or latent.shape[3] == 0:
            raise ValueError(
                f"latent must have {c.latent_channels} channels (dim 1) and h, w > 0, got shape {tuple(latent.shape)}"
            )


def sample_posterior(
    mean: Tensor, logvar: Tensor, generator: torch.Generator | list[torch.Generator] | None = None,
    eps: Tensor | None = None,
) -> Tensor:
    """z = mean + exp(logvar / 2) * eps, eps ~ N(0, I) drawn like diffusers' ``randn_tensor``.

    The noise is drawn in ``mean.dtype`` on the generator's device (then moved to ``mean.device``);
    a list of generators draws row i from generator[i] with shape (1, z, h, w). ``eps`` (the shape of ``mean``)
    gives the standard-normal numbers instead (drawn elsewhere, e.g. by the trainer's data workers).
    """
    shape, device, dtype = tuple(mean.shape), mean.device, mean.dtype
    if eps is not None:
        if generator is not None or tuple(eps.shape) != shape:
            raise ValueError(f"eps: expected shape {shape} and no generator, got {tuple(eps.shape)}")
        eps = eps.to(device, dtype)
    elif isinstance(generator, (list, tuple)):
        if len(generator) != shape[0] or not all(isinstance(g, torch.Generator) for g in generator):
            raise ValueError(
                f"generator list must hold one torch.Generator per batch row ({shape[0]}), got {len(generator)} items"
            )
        rows = [torch.randn((1,) + shape[1:], generator=g, device=g.device, dtype=dtype) for g in generator]
        eps = torch.cat(rows).to(device)
    elif isinstance(generator, torch.Generator):
        eps = torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
    elif generator is None:
        eps = torch.randn(shape, device=device, dtype=dtype)
    else:
        raise ValueError(f"generator must be None, a torch.Generator or a list of them, got {type(generator).__name__}")
    return mean + torch.exp(0.5 * logvar) * eps  # (B, z, h, w)




def _strip(params: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


def _describe(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
