"""The embedded default model: a ~9M-parameter text-to-image model of the builtin shapes world, in this folder.

    ldm txt2img "a green triangle above a yellow circle" --cfg 5     # no --model: this model
    ldm eval                                                         # its prompt adherence

model.safetensors (fp16, 18.6 MB) + config.yaml, the ldm folder format (ldm/formats/native.py). Trained from
scratch on one H200 in three runs (a KL-f4 VAE, then the U-Net and its open_clip-style text tower in two parts);
docs/default_model.md has the exact commands, loss curves and the adherence measured on held-out prompts.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["default_model_path"]


def default_model_path() -> Path:
    """The folder of the embedded default model (loadable with Pipeline.load / ldm.bundle.load_bundle)."""
    return Path(__file__).resolve().parent
