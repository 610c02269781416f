"""The condition flags of `ldm txt2img` / img2img / inpaint (docs/conditions.md): parsed and checked for their form
here, with no model; the loaded model then checks the names and values (inference/conditions.py) before any step.

    --cond NAME=VALUE          a condition's value: an int (class_label), numbers 1,2,3 (scalars), an image file
    --cond-scale NAME=S        its own guidance scale      --cond-weight NAME=W    a control's strength
    --cond-range NAME=A:B      a control's step fractions  --controlnet NAME=FILE  add a published ControlNet
    --original-size H,W  --crop-coords TOP,LEFT  --target-size H,W                 SDXL's size conditioning
"""
from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_condition_arguments", "condition_kwargs"]


def add_condition_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cond", action="append", default=[], metavar="NAME=VALUE",
                   help="a value for one of the model's further conditions (docs/conditions.md): an image file for "
                        "image conditions (control maps, concat images), an int for class_label, numbers (1,2,3) "
                        "for scalars; repeatable")  # fmt: skip
    for flag, what in (("--original-size", "H,W: SDXL's original-size id"), ("--crop-coords", "TOP,LEFT: SDXL's crop id"),
                       ("--target-size", "H,W: SDXL's target-size id")):  # fmt: skip
        p.add_argument(flag, metavar=what.split(":")[0], help=f"{what} (size conditioning; default: the image size, crop 0,0)")
    p.add_argument("--controlnet", action="append", default=[], metavar="NAME=FILE",
                   help="add a published ControlNet (.safetensors, original or diffusers layout) as control NAME; "
                        "give its map with --cond NAME=IMAGE; repeatable")  # fmt: skip
    p.add_argument("--cond-scale", action="append", default=[], metavar="NAME=S",
                   help="a guidance scale of its own for condition NAME (InstructPix2Pix-style; --cfg stays the text's)")
    p.add_argument("--cond-weight", action="append", default=[], metavar="NAME=W",
                   help="strength of control NAME (ControlNet conditioning scale; default: the model's)")
    p.add_argument("--cond-range", action="append", default=[], metavar="NAME=START:END",
                   help="the fractions of the steps where control NAME acts, e.g. 0:0.5 (default: the model's)")


def _pairs(flag: str, items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, v = item.partition("=")
        if not sep or not name or not v:
            raise ValueError(f"{flag} {item!r}: expected NAME=VALUE")
        out[name] = v
    return out


def _number(flag: str, name: str, v: str) -> float:
    try:
        return float(v)
    except ValueError:
        raise ValueError(f"{flag} {name}={v}: not a number") from None


def _cond_value(name: str, v: str):
    """An int (class label), a float or comma-separated floats (scalars), else an image file that must exist."""
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return [float(x) for x in v.split(",")] if "," in v else float(v)
    except ValueError:
        pass
    if not Path(v).is_file():
        raise ValueError(f"--cond {name}={v}: not a number and no such image file")
    return Path(v)


def condition_kwargs(args: argparse.Namespace) -> dict:
    """--cond / --cond-scale / --cond-weight / --cond-range -> the Pipeline's condition arguments (the model checks
    the names and the values' kinds when it is loaded, before any sampling)."""
    out: dict = {}
    values = {}
    for name, v in _pairs("--cond", getattr(args, "cond", [])).items():
        values[name] = _cond_value(name, v)
    if values:
        out["conditions"] = values
    for flag, key in (("--original-size", "original_size"), ("--crop-coords", "crop_coords"), ("--target-size", "target_size")):
        v = getattr(args, key, None)
        if v is not None:
            parts = v.split(",")
            if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
                raise ValueError(f"{flag} {v}: expected two integers, e.g. 1024,1024")
            out[key] = tuple(int(p) for p in parts)
    scales = {k: _number("--cond-scale", k, v) for k, v in _pairs("--cond-scale", getattr(args, "cond_scale", [])).items()}
    weights = {k: _number("--cond-weight", k, v) for k, v in _pairs("--cond-weight", getattr(args, "cond_weight", [])).items()}
    ranges = {}
    for k, v in _pairs("--cond-range", getattr(args, "cond_range", [])).items():
        a, sep, b = v.partition(":")
        if not sep:
            raise ValueError(f"--cond-range {k}={v}: expected START:END, e.g. 0:0.5")
        ranges[k] = (_number("--cond-range", k, a), _number("--cond-range", k, b))
    nets = {}
    for k, v in _pairs("--controlnet", getattr(args, "controlnet", [])).items():
        if Path(v).suffix != ".safetensors" or not Path(v).is_file():
            raise ValueError(f"--controlnet {k}={v}: needs an existing .safetensors file (pickles are not loaded)")
        nets[k] = Path(v)
    for key, d in (("condition_scales", scales), ("condition_weights", weights), ("condition_ranges", ranges),
                   ("controlnets", nets)):  # fmt: skip
        if d:
            out[key] = d
    return out
