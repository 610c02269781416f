"""``ldm convert IN OUT --to original|diffusers|ldm``: rewrite a model in another on-disk format.

    ldm convert sd_xl_base_1.0.safetensors sdxl-base --to ldm --dtype fp16
    ldm convert v2-1_512-ema-pruned.ckpt sd21-base.safetensors --to original --prediction eps
    ldm convert tiny.safetensors tiny-diffusers --to diffusers --set unet.num_heads=2 --set text[0].heads=4

The input format is detected (ldm/formats/detect.py). Without ``--to``, OUT ending in .safetensors means
"original", anything else "ldm". Every argument is checked before any weights are read; a bad one is reported on
one line with exit code 2 (ldm/cli.py turns ValueError into that). Loading happens on the meta device and
straight into ``--dtype`` (default: as stored), so a model is never held twice in memory.

The command is discovered through the ``ldm.commands`` entry point; this module imports nothing heavy at import
time (``ldm --help`` stays fast): torch, the networks and the formats are imported when the command runs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

FORMATS = ("original", "diffusers", "ldm")
DTYPES = ("fp32", "fp16", "bf16")
FAMILIES = ("sd1", "sd2", "sdxl", "custom")
PREDICTIONS = ("eps", "v", "x0")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a model between the original single file, diffusers and ldm formats",
        description="Read a Stable Diffusion model (original .safetensors/.ckpt file, diffusers folder or ldm "
        "folder; detected) and write it in another format.",
    )
    p.add_argument("input", metavar="IN", help="checkpoint file or model folder")
    p.add_argument("output", metavar="OUT", help="output .safetensors file (original) or folder (diffusers, ldm)")
    p.add_argument("--to", default=None, metavar="FORMAT", help=f"one of: {', '.join(FORMATS)} (default: from OUT)")
    p.add_argument("--dtype", default=None, metavar="DTYPE", help=f"one of: {', '.join(DTYPES)} (default: as stored)")
    p.add_argument("--family", default=None, help=f"override the detected family: {', '.join(FAMILIES)}")
    p.add_argument("--prediction", default=None, help=f"override the prediction type: {', '.join(PREDICTIONS)}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. unet.num_head_channels=64 or text[0].heads=12 (repeatable)")
    p.add_argument("--non-strict", action="store_true", help="load what fits instead of failing on a mismatch")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress messages")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    src, dst = Path(args.input), Path(args.output)
    to = check_arguments(args, src, dst)

    started = time.monotonic()
    say = (lambda msg: None) if args.quiet else _progress(started)
    import autoencoder  # noqa: F401,PLC0415 - registers the "vae" component
    import text_encoder  # noqa: F401,PLC0415 - registers the "text" component
    from ldm.bundle import load_bundle, save_bundle  # noqa: PLC0415
    from ldm.config import parse_overrides  # noqa: PLC0415
    from ldm.formats import FORMATS as WRITERS  # noqa: PLC0415
    from ldm.formats import detect_format  # noqa: PLC0415

    parse_overrides(args.overrides)  # malformed KEY=VALUE: one line, before reading anything
    fmt = detect_format(src)
    if to != "original":
        looks_like = WRITERS[to].is_ldm_folder if to == "ldm" else WRITERS[to].is_diffusers_folder
        if dst.is_dir() and any(dst.iterdir()) and not looks_like(dst):
            raise ValueError(f"{dst}: exists and is not a model folder of the {to} format; refusing to replace it")
    bundle = load_bundle(
        src, dtype=args.dtype, family=args.family, prediction=args.prediction, strict=not args.non_strict,
        config_overrides=args.overrides, progress=say,
    )  # fmt: skip
    cfg = bundle.config
    say(f"model: family {cfg.family}, prediction {cfg.diffusion.prediction}, "
        f"{sum(p.numel() for p in bundle.parameters()):,} parameters (read as {fmt})")  # fmt: skip
    save_bundle(bundle, dst, format=to, progress=say)
    say(f"done: {dst}")
    return 0


def check_arguments(args: argparse.Namespace, src: Path, dst: Path) -> str:
    """The output format; ValueError (one line, exit code 2) for any bad argument. Reads no weights."""
    to = args.to or ("original" if dst.suffix == ".safetensors" else "ldm")
    _choice("--to", to, FORMATS)
    for flag, value, allowed in (("--dtype", args.dtype, DTYPES), ("--family", args.family, FAMILIES),
                                 ("--prediction", args.prediction, PREDICTIONS)):  # fmt: skip
        if value is not None:
            _choice(flag, value, allowed)
    if not src.exists():
        raise ValueError(f"{src}: no such file or folder")
    if dst.exists() and os.path.samefile(src, dst):
        raise ValueError(f"{dst}: is the input; write the conversion somewhere else")
    if to == "original":
        if dst.suffix != ".safetensors":
            raise ValueError(f"{dst}: --to original writes one .safetensors file; name OUT *.safetensors")
        if dst.is_dir():
            raise ValueError(f"{dst}: is a folder; --to original writes one .safetensors file")
    elif dst.exists() and not dst.is_dir():
        raise ValueError(f"{dst}: exists and is a file; --to {to} writes a folder")
    return to


def _choice(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{flag}: unknown value {value!r}; one of: {', '.join(allowed)}")


def _progress(started: float):
    def say(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    return say
