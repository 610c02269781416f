"""On-disk formats of a model bundle. Each module has ``NAME``, ``DESCRIPTION``, ``read(path, *, family, prediction,
overrides, strict, progress) -> (ModelConfig, {part: state dict in our layout})`` and ``write(cfg, parts, path,
progress)``; ldm/bundle.py builds and fills the networks.

    original   one .safetensors / weights-only .ckpt file in the CompVis / SGM layout      formats/original.py
    diffusers  a diffusers pipeline folder                                                formats/diffusers_folder.py
    ldm        ours: model.safetensors + config.yaml                                     formats/native.py

Why this file I/O lives in ``ldm`` (ARCHITECTURE.md keeps ``ldm`` free of I/O): training and inference both load
and save bundles and may not import each other, and the formats need every component's key maps, which reach
``ldm`` through the component registry (ldm/components.py). The I/O is confined to ldm/checkpoint.py (safe,
atomic tensor files) and this package; the networks and the mathematics of noise stay I/O-free.
"""
from . import diffusers_folder, native, original
from .detect import detect_format, known_layouts

FORMATS = {"original": original, "diffusers": diffusers_folder, "ldm": native}

__all__ = ["FORMATS", "detect_format", "known_layouts"]
