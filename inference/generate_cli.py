"""``ldm txt2img | img2img | inpaint``: images from prompts, on one process or many.

    ldm txt2img --model sd15.safetensors "a fox in the snow" "a cat" --n 4 --seed 1 --grid
    ldm img2img --model sd15 --init photo.png --strength 0.6 "an oil painting"
    ldm inpaint --model sd15 --init photo.png --mask mask.png "a red door"
    ldm txt2img --model sd15 --from-png outputs/00003-4.png --steps 40     # the same image, 40 steps
    accelerate launch --num_processes 4 -m inference.txt2img --model sd15 --prompt-file prompts.txt --n 8

Every argument is checked before the model is loaded; a bad one is one line ``ldm txt2img: error: ...`` and exit
code 2. The images are the job list of inference/jobs.py (prompt-major, image k has seed ``seed + k``), sampled
``--batch`` at a time; under ``accelerate launch`` each process loads the model and samples its own contiguous
part, and the files are named by the global job index, so N processes write exactly the files one would. Each PNG
carries its GenerationParams (inference/metadata.py), which ``--from-png`` reads back: flags given on the command
line override them, so ``--from-png`` alone reproduces the image (bit for bit on the CPU in fp32 for images made
with ``--batch 1``, the default: matrix kernels round differently for other batch sizes).

Nothing heavy is imported at import time, so ``ldm --help`` stays fast.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

from .condition_cli import add_condition_arguments, condition_kwargs
from .convert import DTYPES, FAMILIES, PREDICTIONS
from .convert import _choice as _check_choice  # one check of a flag's value for every CLI
from .default_model import default_model_path
from .metadata import GenerationParams, read_png_params
from .speed_cli import ATTENTION_KERNELS, COMPILE_MODES, add_speed_arguments, speed_config  # noqa: F401 (re-exported)

MODES = ("txt2img", "img2img", "inpaint")
SCHEDULES = ("discrete", "karras", "exponential")
INPAINT_MODES = ("auto", "blend", "unet")
# copies of ldm/speed.py's choices (``ldm --help`` imports no torch); tests/test_speed_switches.py checks they match
TILE = 64  # --tile without a value: tiles of 64 latent pixels (512 image pixels)

# Defaults of the options that a PNG's metadata can also supply (argparse keeps None, meaning "not given",
# so that --from-png can tell a given flag from a default).
DEFAULTS = dict(negative="", steps=25, sampler="dpmpp_2m", schedule="discrete", cfg=7.5, rescale=0.0, seed=None,
                width=None, height=None, strength=0.8, clip_skip=None, eta=None)  # fmt: skip
# option dest -> GenerationParams field
FROM_PNG = dict(negative="negative", steps="steps", sampler="sampler", schedule="schedule", cfg="cfg_scale",
                rescale="guidance_rescale", seed="seed", width="width", height="height", strength="strength",
                clip_skip="clip_skip", eta="eta")  # fmt: skip

DESCRIPTIONS = {
    "txt2img": "Generate images from text prompts.",
    "img2img": "Redraw an image guided by text prompts: the image is noised to --strength and denoised.",
    "inpaint": "Regenerate the masked part of an image (white in the mask = regenerate, black = keep).",
}


# ------------------------------------------------------------------------------------------------ arguments


def register(subparsers) -> None:
    for mode in MODES:
        p = subparsers.add_parser(
            mode, help=DESCRIPTIONS[mode].split(":")[0].rstrip("."), description=DESCRIPTIONS[mode],
            epilog="Several processes: accelerate launch --num_processes N -m ldm.cli " + mode + " ...",
        )  # fmt: skip
        add_arguments(p, mode)
        p.set_defaults(func=run, mode=mode)


def add_arguments(p: argparse.ArgumentParser, mode: str) -> None:
    p.error = one_line_error(p)  # argparse's own errors too: one line, exit code 2
    from_png = " (default: from --from-png, else %s)"
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts; --n images each")
    p.add_argument("--model", metavar="PATH", help="original .safetensors/.ckpt file, diffusers folder or ldm "
                   "folder (default: the embedded default model, 32 px shapes: inference/default_model)")  # fmt: skip
    p.add_argument("--prompt-file", metavar="FILE", help="more prompts, one per line, after the PROMPT arguments; blank lines are skipped")
    p.add_argument("--from-png", metavar="FILE", help="take every setting stored in this PNG (prompt, seed, size, "
                   "sampler, ...); the flags given here override them")  # fmt: skip
    if mode != "txt2img":
        p.add_argument("--init", required=True, metavar="IMAGE", help="the starting image; sets the default size")
    if mode == "inpaint":
        p.add_argument("--mask", required=True, metavar="MASK", help="mask of the same size: white is regenerated")
        p.add_argument("--inpaint-mode", default="auto", choices=INPAINT_MODES,
                       help="unet: an inpainting model's extra input channels; blend: any model, the kept region "
                       "is blended in at every step; auto: unet if the model has them "
                       "(default: %(default)s)")  # fmt: skip
    p.add_argument("--negative", metavar="TEXT", help="negative prompt" + from_png % "''")
    p.add_argument("--steps", type=int, help="sampling steps" + from_png % DEFAULTS["steps"])
    p.add_argument("--sampler", metavar="NAME", help="sampler, see `ldm samplers`" + from_png % DEFAULTS["sampler"])
    p.add_argument("--schedule", metavar="SPACING", help=f"sigma spacing: {', '.join(SCHEDULES)}"
                   + from_png % DEFAULTS["schedule"])  # fmt: skip
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale" + from_png % DEFAULTS["cfg"])
    p.add_argument("--rescale", type=float, help="guidance rescale in [0, 1] (0.7 for zero-terminal-SNR models)"
                   + from_png % DEFAULTS["rescale"])  # fmt: skip
    p.add_argument("--seed", type=int, help="seed of the first image; image k gets seed + k" + from_png % "random")
    p.add_argument("--width", type=int, help="image width, a multiple of 8" + from_png % _size_default(mode))
    p.add_argument("--height", type=int, help="image height, a multiple of 8" + from_png % _size_default(mode))
    if mode != "txt2img":
        p.add_argument("--strength", type=float, help="how much of the image is redrawn, in [0, 1]; "
                       "int(steps * strength) steps run" + from_png % DEFAULTS["strength"])  # fmt: skip
    p.add_argument("--clip-skip", type=int, metavar="N", help="use the text encoder's N-th layer from the end"
                   + from_png % "the model's")  # fmt: skip
    p.add_argument("--eta", type=float, help="noise scale of ddim / ancestral / SDE samplers"
                   + from_png % "the sampler's")  # fmt: skip
    p.add_argument("--n", type=int, default=1, help="images per prompt (default: %(default)s)")
    p.add_argument("--teleport", type=float, default=0.0, metavar="F", help="skip this fraction of the steps with the "
                   "closed-form Gaussian solution (analytical teleportation, docs/analysis.md); needs "
                   "--teleport-stats (default: 0, off)")  # fmt: skip
    p.add_argument("--teleport-stats", metavar="FILE", help="the data's Gaussian statistics, gaussian.safetensors "
                   "as `ldm analyze` writes it")  # fmt: skip
    p.add_argument("--batch", type=int, default=1, metavar="B", help="images per network call (memory vs speed; "
                   "the images are the same up to float rounding: kernels depend on the batch size, so only "
                   "--batch 1 images are reproduced bit for bit by --from-png; default: %(default)s)")  # fmt: skip
    p.add_argument("--out", default="outputs", metavar="DIR", help="output folder; files NNNNN-SEED.png are numbered "
                   "on from the highest number already there (default: %(default)s/)")  # fmt: skip
    p.add_argument("--grid", action="store_true", help="also write all images of the run as one grid-NNNNN.png "
                   "(default: off)")  # fmt: skip
    p.add_argument("--grid-scale", type=int, default=1, metavar="K", help="enlarge the grid K times (nearest "
                   "neighbour), for small images (default: %(default)s)")  # fmt: skip
    p.add_argument("--device", default=None, help="torch device (default: the accelerate process's device: "
                   "cuda:LOCAL_RANK if there is a GPU, else cpu)")  # fmt: skip
    p.add_argument("--dtype", default="fp32", help=f"network dtype: {', '.join(DTYPES)} (default: %(default)s)")
    p.add_argument("--tile", type=int, nargs="?", const=TILE, metavar="LATENT_PX",
                   help=f"decode with the VAE in tiles of LATENT_PX latent pixels (bounded memory; {TILE} if "
                   "given without a value; default: no tiling)")  # fmt: skip
    add_speed_arguments(p)
    p.add_argument("--family", default=None, help=f"override the detected family: {', '.join(FAMILIES)} "
                   "(default: detected)")  # fmt: skip
    p.add_argument("--prediction", default=None, help=f"override the prediction type: {', '.join(PREDICTIONS)} "
                   "(default: detected)")  # fmt: skip
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="model config override, as in `ldm convert` (repeatable)")  # fmt: skip
    add_condition_arguments(p)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar (default: a bar on stderr)")


def _size_default(mode: str) -> str:
    return "the model's default size" if mode == "txt2img" else "the --init image's size"


def one_line_error(p: argparse.ArgumentParser):
    def error(message: str):
        p.exit(2, f"{p.prog}: error: {message}\n")

    return error


# ------------------------------------------------------------------------------------------------ the request


@dataclass
class Settings:
    """Everything a run needs, checked; ``sampling`` holds the Pipeline keyword arguments shared by all images."""

    mode: str
    model: Path
    prompts: list[str]
    seed: int | None
    n: int
    batch: int
    out: Path
    grid: bool
    grid_scale: int
    device: str | None
    dtype: str
    speed: Any  # ldm.speed.SpeedConfig
    family: str | None
    prediction: str | None
    overrides: list[str]
    quiet: bool
    sampling: dict = field(default_factory=dict)
    png_hash: str = ""  # the model hash stored in the --from-png file


def resolve(args: argparse.Namespace) -> Settings:
    """The checked Settings for parsed ``args``: --from-png values fill what was not given, then defaults.
    ValueError (one line) for any bad argument; reads only image headers and text files, never the model."""
    mode = args.mode
    png = read_png_params(args.from_png) if args.from_png else None  # ValueError: missing, unreadable, no metadata
    value = {k: _pick(getattr(args, k, None), png, k) for k in DEFAULTS}
    if args.eta is None and args.sampler is not None and args.sampler not in _takes_eta():
        value["eta"] = None  # the PNG's eta belongs to its sampler, not to the one asked for

    prompts = list(args.prompts)
    if args.prompt_file:
        prompts += _read_prompt_file(Path(args.prompt_file))
    if not prompts and png is not None:
        prompts = [png.prompt]
    if not prompts:
        raise ValueError("no prompt: give PROMPT arguments, --prompt-file FILE or --from-png FILE")

    _check_choice("--dtype", args.dtype, DTYPES)
    for flag, v, allowed in (("--family", args.family, FAMILIES), ("--prediction", args.prediction, PREDICTIONS)):
        if v is not None:
            _check_choice(flag, v, allowed)
    _check_choice("--schedule", value["schedule"], SCHEDULES)
    _check_sampler(value["sampler"], value["eta"])
    _check_numbers(value, args)
    model = _check_model(Path(args.model) if args.model is not None else default_model_path())
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    device = check_device(args.device)

    images = _check_images(args, value) if mode != "txt2img" else {}  # may set value["width"/"height"]
    sampling = dict(negative=value["negative"], steps=value["steps"], sampler=value["sampler"],
                    schedule=value["schedule"], cfg_scale=value["cfg"], guidance_rescale=value["rescale"],
                    width=value["width"], height=value["height"], clip_skip=value["clip_skip"], eta=value["eta"],
                    tile=args.tile)  # fmt: skip
    sampling.update(condition_kwargs(args))
    if args.teleport:  # analytical teleportation (ldm/samplers/teleport.py); checked by the pipeline
        sampling.update(teleport=args.teleport, teleport_stats=args.teleport_stats)
    if mode != "txt2img":
        sampling.update(images, strength=value["strength"])
    if mode == "inpaint":
        sampling["inpaint"] = args.inpaint_mode
    if png is not None and png.mode != mode:  # only once everything is known to be fine
        print(f"ldm {mode}: note: {args.from_png} was made by {png.mode}; running {mode} with its settings",
              file=sys.stderr)  # fmt: skip
    return Settings(
        mode=mode, model=model, prompts=prompts, seed=value["seed"], n=args.n, batch=args.batch, out=out,
        grid=args.grid, grid_scale=args.grid_scale, device=device, dtype=args.dtype, speed=speed_config(args), family=args.family,
        prediction=args.prediction, overrides=list(args.overrides), quiet=args.quiet, sampling=sampling,
        png_hash=png.model_hash if png is not None else "",
    )  # fmt: skip


def _pick(given, png: GenerationParams | None, key: str):
    if given is not None:
        return given
    if png is not None and getattr(png, FROM_PNG[key]) is not None:
        return getattr(png, FROM_PNG[key])
    return DEFAULTS[key]


def _read_prompt_file(path: Path) -> list[str]:
    if not path.is_file():
        raise ValueError(f"--prompt-file {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompt-file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--prompt-file {path}: no prompts (only blank lines)")
    return prompts


def _takes_eta() -> tuple[str, ...]:
    from ldm.samplers.config import TAKES_ETA  # noqa: PLC0415

    return TAKES_ETA


def _check_sampler(name: str, eta: float | None) -> None:
    from ldm.samplers import SAMPLERS  # noqa: PLC0415

    if name not in SAMPLERS:
        raise ValueError(f"--sampler: unknown sampler {name!r}; one of: {', '.join(sorted(SAMPLERS))}")
    if eta is not None and name not in _takes_eta():
        raise ValueError(f"--eta: sampler {name!r} has no eta; samplers with eta: {', '.join(_takes_eta())}")


def _check_numbers(value: dict, args: argparse.Namespace) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    need(value["steps"] >= 1, f"--steps: must be >= 1, got {value['steps']}")
    for flag in ("width", "height"):
        v = value[flag]
        need(v is None or (v > 0 and v % 8 == 0), f"--{flag}: must be a positive multiple of 8, got {v}")
    need(value["cfg"] >= 0, f"--cfg: must be >= 0, got {value['cfg']}")
    need(0 <= value["rescale"] <= 1, f"--rescale: must be in [0, 1], got {value['rescale']}")
    need(value["eta"] is None or value["eta"] >= 0, f"--eta: must be >= 0, got {value['eta']}")
    need(value["clip_skip"] is None or value["clip_skip"] >= 1, f"--clip-skip: must be >= 1, got {value['clip_skip']}")
    need(args.n >= 1, f"--n: must be >= 1, got {args.n}")
    need(args.batch >= 1, f"--batch: must be >= 1, got {args.batch}")
    need(1 <= args.grid_scale <= 16, f"--grid-scale: must be in [1, 16], got {args.grid_scale}")
    need(args.tile is None or args.tile >= 1, f"--tile: must be >= 1 latent pixels, got {args.tile}")
    seed = value["seed"]
    need(seed is None or seed >= 0, f"--seed: must be >= 0, got {seed}")
    if args.mode != "txt2img":
        s, steps = value["strength"], value["steps"]
        need(0 <= s <= 1, f"--strength: must be in [0, 1], got {s}")
        need(int(steps * s) >= 1, f"--strength {s} with --steps {steps} runs int(steps * strength) = 0 steps; "
             "raise --strength or --steps")  # fmt: skip


def _check_model(path: Path) -> Path:
    from ldm.formats import detect_format  # noqa: PLC0415 - reads no weights, only names of files

    if not path.exists():
        raise ValueError(f"--model {path}: no such file or folder")
    detect_format(path)  # ValueError: not a model
    return path


def check_device(device: str | None) -> str | None:
    if device is None:
        return None
    import torch  # noqa: PLC0415

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here")
    return device


def _check_images(args: argparse.Namespace, value: dict) -> dict:
    """Paths and the size of --init (and --mask): they must agree with each other and with --width/--height.
    Reads only the image headers. Fills value['width'/'height'] from the init image when not given."""
    w, h = init_size = _image_size("--init", Path(args.init))
    if value["width"] is None and value["height"] is None and (w % 8 or h % 8):
        raise ValueError(f"--init {args.init}: {w}x{h} is not a multiple of 8; resize or crop it")
    value["width"] = w if value["width"] is None else value["width"]
    value["height"] = h if value["height"] is None else value["height"]
    if (value["width"], value["height"]) != init_size:
        raise ValueError(f"--init {args.init}: is {w}x{h}, but the size asked for is "
                         f"{value['width']}x{value['height']}; give an image of that size")  # fmt: skip
    found = {"init_image": Path(args.init)}
    if args.mode == "inpaint":
        mw, mh = _image_size("--mask", Path(args.mask))
        if (mw, mh) != init_size:
            raise ValueError(f"--mask {args.mask}: is {mw}x{mh}, the --init image {w}x{h}; they must be the same size")
        found["mask"] = Path(args.mask)
    return found


def _image_size(flag: str, path: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    if not path.is_file():
        raise ValueError(f"{flag} {path}: no such file")
    try:
        with Image.open(path) as im:  # lazy: reads the header only
            return im.size
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{flag} {path}: not a readable image ({e})") from None


# ------------------------------------------------------------------------------------------------ running


def load_pipeline(path: Path, **kwargs):
    """``Pipeline.load`` (a seam for tests, which put a fake pipeline here)."""
    from .pipeline import Pipeline  # noqa: PLC0415

    return Pipeline.load(path, **kwargs)


def run(args: argparse.Namespace) -> int:
    return generate(resolve(args))


def generate(req: Settings) -> int:
    """Sample this process's share of the job list and write its PNGs; the main process also writes the grid."""
    from accelerate import PartialState  # noqa: PLC0415

    from .jobs import batches, image_name, make_jobs, process_share, shared_seed, shared_start_index  # noqa: PLC0415

    state = PartialState()
    jobs = make_jobs(req.prompts, req.n, shared_seed(req.seed, state))
    mine = process_share(list(batches(jobs, req.batch)), state)  # whole batches: the same ones as one process runs
    req.out.mkdir(parents=True, exist_ok=True)
    start = shared_start_index(req.out, state)
    if mine:
        _sample(req, mine, start, state)
    state.wait_for_everyone()
    if state.is_main_process:
        paths = [req.out / image_name(start, job) for job in jobs]
        where = f"{paths[0].name} .. {paths[-1].name}" if len(paths) > 1 else paths[0].name
        print(f"ldm {req.mode}: {len(paths)} image(s) in {req.out}/ ({where})", file=sys.stderr, flush=True)
        if req.grid:
            print(_write_grid(paths, len(req.prompts), req.out, start, req.grid_scale), flush=True)
    return 0


def _sample(req: Settings, chunks: list[list], start: int, state) -> None:
    """Load the model, sample ``chunks`` (this process's batches of jobs), write and print each image's path."""
    from tqdm import tqdm  # noqa: PLC0415

    from .jobs import image_name  # noqa: PLC0415
    from .metadata import png_info  # noqa: PLC0415

    device = req.device or str(state.device)
    pipe = load_pipeline(req.model, device=device, dtype=req.dtype, family=req.family, prediction=req.prediction,
                         config_overrides=req.overrides, speed=req.speed)  # fmt: skip
    if req.png_hash and pipe.model_hash and req.png_hash != pipe.model_hash:
        print(f"ldm {req.mode}: note: the --from-png image was made by a model with hash {req.png_hash}, "
              f"this one has {pipe.model_hash}", file=sys.stderr)  # fmt: skip
    kwargs = _pipeline_kwargs(req, pipe)
    pipe.check(prompt=[j.prompt for j in chunks[0]], seed=chunks[0][0].seed, n=1, **kwargs)  # ValueError: exit 2
    steps = kwargs["steps"] if req.mode == "txt2img" else int(kwargs["steps"] * kwargs["strength"])
    bar = tqdm(total=len(chunks) * steps, unit="step", disable=req.quiet, position=state.process_index,
               desc=f"[{state.process_index}] {req.mode}" if state.num_processes > 1 else req.mode)  # fmt: skip
    for b, chunk in enumerate(chunks):
        bar.set_postfix_str(f"batch {b + 1}/{len(chunks)}")
        result = pipe([j.prompt for j in chunk], seed=chunk[0].seed, n=1, callback=_advance(bar, b * steps), **kwargs)
        for job, image, params in zip(chunk, result.images, result.params, strict=True):
            if (params.prompt, params.seed) != (job.prompt, job.seed):
                raise RuntimeError(f"pipeline returned {params.prompt!r}, seed {params.seed} for {job}")
            path = req.out / image_name(start, job)
            image.save(path, pnginfo=png_info(params))
            bar.write(str(path), file=sys.stdout)
        bar.update(b * steps + steps - bar.n)
    bar.close()


def _pipeline_kwargs(req: Settings, pipe) -> dict:
    kwargs = dict(req.sampling)
    if "controlnets" in kwargs:  # published ControlNets join the model as control conditions
        from .conditions import attach_controlnet  # noqa: PLC0415

        for name, path in kwargs.pop("controlnets").items():
            attach_controlnet(pipe.bundle, path, name=name)
    if kwargs["width"] is None or kwargs["height"] is None:
        w, h = pipe.default_size
        kwargs["width"] = kwargs["width"] or w
        kwargs["height"] = kwargs["height"] or h
    if "init_image" in kwargs:  # read once, not per batch
        from .images import open_image  # noqa: PLC0415

        for key in ("init_image", "mask"):
            if key in kwargs:
                kwargs[key] = open_image(kwargs[key], key)
    return kwargs


def _advance(bar, done_before: int):
    """A sampler callback that moves ``bar`` to the step being finished (robust to samplers that call it per step)."""

    def callback(step) -> None:
        bar.update(max(0, done_before + step.i + 1 - bar.n))

    return callback


def _write_grid(paths: list[Path], n_prompts: int, out: Path, start: int, scale: int = 1) -> Path:
    from PIL import Image  # noqa: PLC0415

    from .grid import grid_columns, image_grid  # noqa: PLC0415
    from .jobs import grid_name  # noqa: PLC0415

    images = []
    for p in paths:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
    path = out / grid_name(start)
    grid = image_grid(images, grid_columns(len(images), n_prompts))
    if scale > 1:  # small models (32 px): enlarged for viewing, pixels kept sharp
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    grid.save(path)
    return path
