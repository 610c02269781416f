"""On-disk formats of a model bundle. Each module has ``NAME``, ``DESCRIPTION``, ``read(path, *, family, prediction,
overrides, strict, progress) -> (ModelConfig, {part: state dict in our layout})`` and ``write(cfg, parts, path,
progress)``; ldm/bundle.py builds and fills the networks.

    original   one .safetensors / weights-only .ckpt file in the CompVis / SGM layout      formats/original.py
    diffusers  a diffusers pipeline folder                                                formats/diffusers_folder.py
    ldm        ours: model.safetensors + config.yaml                                     formats/native.py
"""
from . import diffusers_folder, native, original
from .detect import detect_format, known_layouts

FORMATS = {"original": original, "diffusers": diffusers_folder, "ldm": native}

__all__ = ["FORMATS", "detect_format", "known_layouts"]
