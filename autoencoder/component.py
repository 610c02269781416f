"""Registers the KL autoencoder as the ``vae`` component of a model bundle (see ldm/components.py).

The key maps and the diffusers config translation are those of autoencoder/keys.py; the original layout is
ours after its ``first_stage_model.`` prefix (stripped by ldm/formats/original.py), with training-only
``loss.*`` entries dropped and 2-d attention projections of re-saved files reshaped by ``original_to_ours``.
"""
from __future__ import annotations

from ldm.components import ComponentSpec, register_component
from ldm.vae_config import AutoencoderConfig

from autoencoder.keys import config_from_diffusers, config_to_diffusers, diffusers_to_ours, original_to_ours, ours_to_diffusers
from autoencoder.vae import AutoencoderKL


def _to_diffusers_config(cfg: AutoencoderConfig) -> dict:
    return {"_class_name": "AutoencoderKL", **config_to_diffusers(cfg)}


def _from_diffusers_config(d: dict) -> dict:
    return config_from_diffusers(d).to_dict()


SPEC = register_component(ComponentSpec(
    name="vae",
    build=AutoencoderKL,
    from_diffusers=diffusers_to_ours,
    to_diffusers=ours_to_diffusers,
    from_original={"ldm": lambda sd, cfg: original_to_ours(sd, prefix="")},
    to_original={"ldm": lambda sd, cfg: dict(sd)},
    config_to_diffusers=_to_diffusers_config,
    config_from_diffusers=_from_diffusers_config,
))  # fmt: skip
