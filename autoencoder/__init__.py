"""The VAE: encode(image) -> latent (scale factor applied here, once), decode(latent) -> image; tiling; key maps."""
from autoencoder.blocks import AttnBlock, Decoder, Downsample, Encoder, ResnetBlock, Upsample
from autoencoder.keys import (
    config_from_diffusers,
    config_to_diffusers,
    diffusers_to_ours,
    original_to_ours,
    ours_to_diffusers,
)
from autoencoder.tiling import decode_tiled, encode_tiled, moments_tiled
from autoencoder.vae import AutoencoderConfig, AutoencoderKL, NonFiniteOutputError, sample_posterior

__all__ = [
    "AutoencoderConfig",
    "AutoencoderKL",
    "NonFiniteOutputError",
    "sample_posterior",
    "decode_tiled",
    "encode_tiled",
    "moments_tiled",
    "diffusers_to_ours",
    "ours_to_diffusers",
    "original_to_ours",
    "config_from_diffusers",
    "config_to_diffusers",
    "Encoder",
    "Decoder",
    "ResnetBlock",
    "AttnBlock",
    "Downsample",
    "Upsample",
]
from autoencoder import component  # noqa: E402,F401  registers the "vae" component (ldm/components.py)
