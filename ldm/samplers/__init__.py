"""Samplers as plain functions with one signature (see common.py); ``get_sampler(name)`` looks them up."""
from .common import SAMPLERS, STOCHASTIC, Callback, DenoiseFn, NoiseFn, Step, get_sampler, per_sample_noise, randn_per_sample
from . import euler, ddim, multistep, dpmpp, unipc  # noqa: F401  (registration)
from .euler import sample_euler

__all__ = [
    "SAMPLERS", "STOCHASTIC", "Callback", "DenoiseFn", "NoiseFn", "Step", "get_sampler", "per_sample_noise",
    "randn_per_sample", "sample_euler",
]
