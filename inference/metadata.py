"""Generation parameters: what made an image, written into its PNG and read back.

The PNG ``parameters`` text chunk uses the layout that AUTOMATIC1111's web UI writes and other tools read:

    a cat on a mat
    Negative prompt: blurry
    Steps: 25, Sampler: dpmpp_2m, Schedule type: karras, CFG scale: 7.5, Seed: 1, Size: 512x512, Model hash: 0123456789, Model: sd15

Sampler names are ours (``ldm samplers``); reading also accepts the web UI's names for the common ones.
Values containing commas or colons are JSON-quoted, as the web UI does. ``Model hash`` is the first 10 hex digits
of the SHA-256 of the weights file (the web UI's "AutoV2" hash).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

from PIL import Image, PngImagePlugin

# the web UI's names for our samplers (reading only)
WEBUI_SAMPLERS = {
    "Euler": "euler", "Euler a": "euler_ancestral", "Heun": "heun", "DPM2": "dpm2", "LMS": "lms", "DDIM": "ddim",
    "PLMS": "plms", "DDPM": "ddpm", "UniPC": "unipc", "DPM++ 2M": "dpmpp_2m", "DPM++ 2M SDE": "dpmpp_2m_sde",
    "DPM++ 3M SDE": "dpmpp_3m_sde",
}


@dataclass
class GenerationParams:
    prompt: str
    negative: str = ""
    steps: int = 25
    sampler: str = "dpmpp_2m"
    schedule: str = "discrete"  # sigma spacing: discrete | karras | exponential
    cfg_scale: float = 7.5
    seed: int = 0
    width: int = 512
    height: int = 512
    model: str = ""
    model_hash: str = ""
    strength: Optional[float] = None  # img2img / inpaint
    guidance_rescale: float = 0.0
    clip_skip: Optional[int] = None
    eta: Optional[float] = None
    mode: str = "txt2img"  # txt2img | img2img | inpaint


# (label in the text, field) in the order written
_LABELS = [
    ("Steps", "steps"), ("Sampler", "sampler"), ("Schedule type", "schedule"), ("CFG scale", "cfg_scale"),
    ("Seed", "seed"), ("Size", None), ("Model hash", "model_hash"), ("Model", "model"),
    ("Denoising strength", "strength"), ("CFG rescale", "guidance_rescale"), ("Clip skip", "clip_skip"),
    ("Eta", "eta"), ("Mode", "mode"),
]
_DEFAULTS = GenerationParams(prompt="")


def _quote(v) -> str:
    s = str(v)
    return json.dumps(s) if ("," in s or ":" in s or '"' in s) else s


def format_parameters(p: GenerationParams) -> str:
    """The ``parameters`` text for ``p``."""
    items = []
    for label, name in _LABELS:
        if name is None:
            items.append(f"Size: {p.width}x{p.height}")
            continue
        v = getattr(p, name)
        if v is None or (v == "" and name in ("model", "model_hash")):
            continue
        if name in ("guidance_rescale",) and v == 0:
            continue
        items.append(f"{label}: {_quote(v)}")
    lines = [p.prompt]
    if p.negative:
        lines.append(f"Negative prompt: {p.negative}")
    lines.append(", ".join(items))
    return "\n".join(lines)


_ITEM = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> GenerationParams:
    """Inverse of ``format_parameters``; also reads the web UI's own files for the fields it shares."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("parameters text is empty")
    lines = text.strip("\n").split("\n")
    last = lines[-1]
    if not _ITEM.match(last) or "Steps:" not in last:
        raise ValueError(f"not a generation-parameters text (no 'Steps:' line): {text[:80]!r}")
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in lines[:-1]:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].lstrip()
        (negative_lines if in_negative else prompt_lines).append(line)
    values = {}
    for m in _ITEM.finditer(last):
        k, v = m.group(1).strip(), m.group(2).strip()
        if v.startswith('"'):
            v = json.loads(v)
        values[k] = v
    types = {f.name: f.type for f in fields(GenerationParams)}
    out = dict(prompt="\n".join(prompt_lines), negative="\n".join(negative_lines))
    for label, name in _LABELS:
        if label not in values:
            continue
        v = values[label]
        if name is None:
            w, h = v.lower().split("x")
            out["width"], out["height"] = int(w), int(h)
            continue
        t = types[name]
        if "int" in t:
            out[name] = int(v)
        elif "float" in t:
            out[name] = float(v)
        else:
            out[name] = v
    if out.get("sampler") in WEBUI_SAMPLERS:
        out["sampler"] = WEBUI_SAMPLERS[out["sampler"]]
    if values.get("Schedule type", "").lower() in ("karras", "exponential"):
        out["schedule"] = values["Schedule type"].lower()
    return GenerationParams(**out)


def png_info(p: GenerationParams) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", format_parameters(p))
    info.add_text("ldm", json.dumps(asdict(p)))  # exact, for --from-png
    return info


def read_png_params(path: str | os.PathLike) -> GenerationParams:
    """The parameters stored in a PNG by ``png_info`` (exact) or by another tool (``parameters`` text)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    try:
        with Image.open(path) as im:
            text = dict(im.text) if hasattr(im, "text") else {}
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        raise ValueError(f"{path}: not a readable PNG ({e})") from None
    if "ldm" in text:
        return GenerationParams(**json.loads(text["ldm"]))
    if "parameters" in text:
        return parse_parameters(text["parameters"])
    raise ValueError(f"{path}: carries no generation parameters (no 'parameters' text chunk)")


def model_hash(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """First 10 hex digits of the SHA-256 of a weights file (for a folder: of its main weights file)."""
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "unet/diffusion_pytorch_model.safetensors"):
            if (path / name).exists():
                path = path / name
                break
        else:
            return ""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:10]
